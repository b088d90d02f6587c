"""The plugin author's guide (docs/plugins.md) runs as written: its example plugin registers, decodes losslessly,
and its test passes."""

import re
import types

from propd.plugins import Registry
from propd.testing import assert_lossless, random_prompts, tiny_model

from conftest import ROOT


def _blocks() -> list[str]:
    text = (ROOT / "docs" / "plugins.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_guides_example_plugin_works():
    plugin = types.ModuleType("my_bigram")
    exec(compile(_blocks()[0], "docs/plugins.md", "exec"), plugin.__dict__)
    reg = Registry(extra_plugins=[plugin], entry_points=False)
    assert "bigram" in reg.names("proposer") and "bigram" in reg.presets
    model = tiny_model(seed=3)
    prompts = [p + p for p in random_prompts(model, 2, [5, 9, 3])]  # repeats: the bigram finds matches
    res = assert_lossless(model, prompts, 24, preset="bigram", plugins=[plugin], entry_points=False)
    assert any(s.tree_nodes > 1 for s in res.stats)


def test_the_guides_plugin_test_passes():
    import sys

    plugin = types.ModuleType("my_bigram")
    exec(compile(_blocks()[0], "docs/plugins.md", "exec"), plugin.__dict__)
    sys.modules["my_bigram"] = plugin
    try:
        ns: dict = {}
        exec(compile(_blocks()[1], "docs/plugins.md", "exec"), ns)
        ns["test_bigram_is_lossless"]()  # a hypothesis test: runs its examples
    finally:
        del sys.modules["my_bigram"]
