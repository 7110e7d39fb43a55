"""The studies under scripts/ re-measure a run when the defaults it ran with change, and a page
written whole keeps the tables other studies fill in it."""
import fxq
from scripts import readme
from scripts.sweeps import Cache, key_of


def test_a_cache_key_names_every_field_so_a_changed_default_misses(tmp_path):
    cache = Cache(tmp_path / "runs.json")
    cache.add(key_of(fxq.QConfig(act_range="minmax"), model="m"), {"accuracy": 1.0})
    assert cache.get(key_of(fxq.QConfig(act_range="minmax"), model="m"))["accuracy"] == 1.0
    assert cache.get(key_of(fxq.QConfig(act_range="mse"), model="m")) is None
    assert cache.get(key_of(fxq.QConfig(act_range="minmax"), model="other")) is None


def test_retain_drops_runs_no_longer_measured_from_the_file(tmp_path):
    path = tmp_path / "runs.json"
    kept, stale = key_of(fxq.QConfig(), model="m"), key_of(fxq.QConfig(weight_bits=4), model="m")
    cache = Cache(path)
    cache.add(kept, {"accuracy": 1.0})
    cache.add(stale, {"accuracy": 0.5})
    cache.retain([kept])
    reread = Cache(path)
    assert reread.get(kept) is not None and reread.get(stale) is None


def test_a_page_written_whole_keeps_the_blocks_other_scripts_filled():
    old = "intro\n<!-- table:start -->\n| a |\n|---|\n<!-- table:end -->\nold prose\n"
    new = "new intro\n<!-- table:start -->\n(run the study)\n<!-- table:end -->\nnew prose\n" \
          "<!-- fresh:start -->\n(run it)\n<!-- fresh:end -->\n"
    kept = readme.blocks_kept(new, old)
    assert kept.startswith("new intro\n<!-- table:start -->\n| a |\n|---|\n<!-- table:end -->\nnew prose")
    assert "<!-- fresh:start -->\n(run it)\n<!-- fresh:end -->" in kept
