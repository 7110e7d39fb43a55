"""Calibration on a 2-process gloo group (loopback): every rank ends with the model one process
calibrating on the union of the shards produces, bit for bit, for every range rule."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fxq
from fxq.analysis.comparison import sensitivity
from tests.helpers import Residual, randomize_bn

pytestmark = pytest.mark.real_data  # spawns its ranks: left to `make test`
WORLD = 2
CONFIGS = {
    "minmax": fxq.QConfig(),
    "percentile": fxq.QConfig(act_range="percentile"),
    "mse": fxq.QConfig(act_range="mse"),
    "entropy": fxq.QConfig(act_range="entropy"),
    # the rule's own integers (their Gram matrices summed over ranks); "reconstruct" learns from them
    "output_aware": fxq.QConfig(weight_bits=4, weight_range="output_aware", bias_correction=True, reconstruct=False),
    "reconstruct": fxq.QConfig(weight_bits=4, act_bits=4, reconstruct=True, reconstruct_iterations=40),
}
# Reconstruction learns on every rank's samples in rank order: one process sees them so too.
IN_RANK_ORDER = {"reconstruct"}


def _model():
    torch.manual_seed(0)
    return randomize_bn(Residual(8))


def _batches():
    """Six batches whose spread grows, so each histogram's grid coarsens as the data arrives."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 8, 16, 16, generator=g) * (1 + i) for i in range(6)]


def _labelled():
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 8, 16, 16, generator=g) * 2, torch.randint(0, 5, (8,), generator=g)) for _ in range(5)]


def _in_rank_order(items: list) -> list:
    """The union of the shards as the ranks hold them: rank 0's, then rank 1's."""
    return [item for r in range(WORLD) for item in items[r::WORLD]]


def _searched(search) -> tuple:
    return search.bits, search.errors, [p.accuracy for p in search.curve], search.float_accuracy


def _join(rank: int, folder) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)


def _quantize_shards(rank: int, folder) -> None:
    _join(rank, folder)
    try:
        shard = _batches()[rank::WORLD]
        for name, config in CONFIGS.items():
            fxq.save(fxq.quantize(_model(), shard, config), folder / f"{name}_{rank}.fxq")
        only_one = _batches()[:1] if rank == 0 else []  # a rank may hold no data at all
        fxq.save(fxq.quantize(_model(), only_one), folder / f"one_batch_{rank}.fxq")
        qmodel = fxq.load(folder / f"minmax_{rank}.fxq")
        result = fxq.evaluate(qmodel, _labelled()[rank::WORLD], _model())
        torch.save((result.accuracy, result.samples, result.layers.rows), folder / f"evaluation_{rank}.pt")
        search = fxq.search_bits(_model(), _labelled()[rank::WORLD], 6.0, candidates=(4, 8))
        torch.save(_searched(search), folder / f"search_{rank}.pt")
        images, labels = (torch.cat(t) for t in zip(*_labelled()[rank::WORLD]))
        study = sensitivity(_model(), qmodel, images, labels)
        torch.save((study.float_accuracy, study.all_quantized, study.rows), folder / f"sensitivity_{rank}.pt")
    finally:
        dist.destroy_process_group()


def _fail_on_rank_1(rank: int, folder) -> None:
    _join(rank, folder)
    try:
        shard = _batches()[rank::WORLD]
        if rank == 1:
            shard[0][0, 0, 0, 0] = float("nan")
        try:
            fxq.quantize(_model(), shard)
        except Exception as error:
            (folder / f"error_{rank}.txt").write_text(f"{type(error).__name__}: {error}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ranks")
    mp.spawn(_quantize_shards, args=(folder,), nprocs=WORLD, join=True)
    return folder


def _same(a, b) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


@pytest.mark.parametrize("rule", sorted(CONFIGS))
def test_every_rank_ends_with_the_model_one_process_makes_from_the_union(shards, rule):
    ranks = [fxq.load(shards / f"{rule}_{r}.fxq") for r in range(WORLD)]
    data = _in_rank_order(_batches()) if rule in IN_RANK_ORDER else _batches()
    single = fxq.quantize(_model(), data, CONFIGS[rule])
    x = torch.randn(16, 8, 16, 16) * 3
    for model in ranks:
        _same(model, single)
        assert torch.equal(model(x), single(x))


def test_a_rank_without_data_gets_the_model_of_the_others(shards):
    single = fxq.quantize(_model(), _batches()[:1])
    for r in range(WORLD):
        _same(fxq.load(shards / f"one_batch_{r}.fxq"), single)


def test_evaluation_over_shards_is_the_evaluation_of_the_union_on_every_rank(shards):
    single = fxq.evaluate(fxq.load(shards / "minmax_0.fxq"), _labelled(), _model())
    for r in range(WORLD):
        accuracy, samples, rows = torch.load(shards / f"evaluation_{r}.pt")
        assert (accuracy, samples) == (single.accuracy, single.samples) == (accuracy, 40)
        assert [n for n, _, _ in rows] == [n for n, _, _ in single.layers.rows]
        for (_, c, i), (_, c1, i1) in zip(rows, single.layers.rows):  # float64 sums in another order
            assert c == pytest.approx(c1, rel=1e-12) and i == pytest.approx(i1, rel=1e-12)


def test_bit_search_divides_the_layers_and_finds_what_one_process_finds(shards):
    single = _searched(fxq.search_bits(_model(), _in_rank_order(_labelled()), 6.0, candidates=(4, 8)))
    for r in range(WORLD):
        assert torch.load(shards / f"search_{r}.pt", weights_only=False) == single


def test_sensitivity_divides_the_layers_and_gathers_the_whole_study(shards):
    images, labels = (torch.cat(t) for t in zip(*_in_rank_order(_labelled())))
    study = sensitivity(_model(), fxq.load(shards / "minmax_0.fxq"), images, labels)
    for r in range(WORLD):
        assert torch.load(shards / f"sensitivity_{r}.pt") == (study.float_accuracy, study.all_quantized, study.rows)


def test_an_error_on_one_rank_stops_every_rank_saying_where(tmp_path):
    mp.spawn(_fail_on_rank_1, args=(tmp_path,), nprocs=WORLD, join=True)
    assert "NaN or Inf" in (tmp_path / "error_1.txt").read_text()
    assert (tmp_path / "error_0.txt").read_text().startswith("RuntimeError: rank 1 failed: ValueError:")
