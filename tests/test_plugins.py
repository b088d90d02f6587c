"""Roles, registration, and third-party discovery through the ``propd`` entry-point group."""

import sys
import textwrap

import pytest

import propd
from conftest import tiny_loaded
from propd import Decoder, PropdError
from propd.plugins import Registry, step_manager
from propd.strategies.greedy import GreedyVerifier
from propd.strategies.static import StaticConfig, StaticSizer

MODEL = tiny_loaded(seed=0, heads=2)


def test_builtin_components_are_registered():
    reg = Registry(entry_points=False)
    assert reg.names("sizer") == ["medusa-heuristic", "propd-dynamic", "static"]
    assert reg.names("proposer") == ["composite", "eagle", "medusa"] and reg.names("verifier") == ["greedy", "sampling", "typical"]
    assert reg.names("pruner") == ["early-prob", "early-topk"]


def test_unknown_names_and_options_are_refused():
    with pytest.raises(PropdError, match="unknown sizer 'nope'"):
        Decoder(MODEL, sizer="nope")
    with pytest.raises(PropdError, match="no option"):
        Decoder(MODEL, sizer=("static", {"depth": 3}))
    with pytest.raises(PropdError, match="unknown preset"):
        Decoder(MODEL, preset="fast")


def test_roles_need_exactly_one_implementation():
    with pytest.raises(PropdError, match="exactly one sizer, got 0"):
        Decoder(MODEL, preset=None, verifier="greedy")
    extra = StaticSizer(StaticConfig(tree="chain:1"))
    with pytest.raises(PropdError, match="does not implement propd_verify"):
        Decoder(MODEL, preset=None, sizer=extra, verifier=StaticSizer(StaticConfig()))
    two = [("sizer", extra), ("sizer", StaticSizer(StaticConfig())), ("verifier", GreedyVerifier())]
    with pytest.raises(PropdError, match="exactly one sizer, got 2"):
        step_manager(two)
    with pytest.raises(PropdError, match="exactly one verifier, got 0"):
        step_manager([("sizer", extra)])


def test_a_tree_without_a_proposer_is_refused():
    dec = Decoder(MODEL, preset=None, sizer=("static", {"tree": "chain:2"}), verifier=GreedyVerifier())
    with pytest.raises(PropdError, match="no proposer"):
        dec.generate_ids([[1, 2]], max_new_tokens=3)


def test_decoders_have_their_own_managers():
    a, b = Decoder(MODEL, preset="ar"), Decoder(MODEL, preset="medusa")
    assert a.pm is not b.pm
    assert len(a.pm.hook.propd_propose.get_hookimpls()) == 0
    assert len(b.pm.hook.propd_propose.get_hookimpls()) == 1


def test_third_party_plugin_found_through_entry_points(tmp_path, monkeypatch):
    """A package that declares itself in the ``propd`` entry-point group is found and its components used."""
    pkg = tmp_path / "site"
    (pkg / "my_propd_plugin.py").parent.mkdir()
    (pkg / "my_propd_plugin.py").write_text(textwrap.dedent('''
        import propd
        from propd.strategies.greedy import GreedyVerifier

        class Counting(GreedyVerifier):
            calls = 0
            @propd.hookimpl
            def propd_verify(self, draft, nodes, logits):
                Counting.calls += 1
                return super().propd_verify(draft, nodes, logits)

        @propd.hookimpl
        def propd_register_components(register):
            register("verifier", "counting", Counting, None, "greedy, counting its calls")
    '''))
    dist = pkg / "my_propd_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-propd-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[propd]\nmine = my_propd_plugin\n")
    monkeypatch.syspath_prepend(str(pkg))
    assert "counting" in Registry().names("verifier")
    dec = Decoder(MODEL, preset="ar", verifier="counting")
    out = dec.generate_ids([[3, 4, 5]], max_new_tokens=5)
    assert out.token_ids == Decoder(MODEL, preset="ar").generate_ids([[3, 4, 5]], max_new_tokens=5).token_ids
    assert sys.modules["my_propd_plugin"].Counting.calls == 4  # 5 tokens: prefill + 4 verified steps


def test_oracle_plugin_package_registers_its_components():
    import propd_oracle

    reg = Registry(extra_plugins=[propd_oracle], entry_points=False)
    assert "oracle" in reg.names("proposer") and "random" in reg.names("pruner")
    pruner = reg.get("pruner", "random").build({"layer": 2, "keep": 0.5})
    assert isinstance(pruner, propd_oracle.RandomPruner) and pruner.propd_prune_layer() == 2


def test_installed_plugin_packages_add_components_and_presets(capsys):
    """The README's test command installs plugins/propd-lookup: its entry point adds a proposer and two presets."""
    from propd.cli import main

    assert main(["components"]) == 0
    assert "prompt-lookup" in capsys.readouterr().out
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "\nlookup " in out and "\nmedusa+lookup " in out
