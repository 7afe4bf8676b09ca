"""The dispatcher behind overlap="auto": its choice, its margin, its cache and its agreement across
ranks. Synthetic timings test the decision logic; real timings test that every rank sees one value."""

import copy
import json

import pytest
import torch

from interlace import OverlapConfig, parallelize
from interlace.engine.comm import spawn
from interlace.engine.overlap import dispatch
from interlace.engine.overlap.dispatch import MARGIN, Case, Dispatcher, measure_collectively
from interlace.models import LlamaForCausalLM, init_weights, tiny

CASE = dict(pattern="gemm_ar", m=64, n=32, k=16, dtype=torch.float32)
MEASURED = 4  # timings per decision here: bulk, chunked x2 and x4, then bulk again


class Timings:
    """A measurement stand-in: seconds per strategy label (per rank), counting calls."""

    def __init__(self, per_rank):
        self.per_rank, self.calls = per_rank, 0

    def __call__(self, group, case, config):
        self.calls += 1
        label = config.strategy if config.strategy != "chunked" else f"chunkedx{config.chunks}"
        return max(t[label] for t in self.per_rank)  # what measure_collectively returns: the slowest rank


def decide(group, path, timings):
    d = Dispatcher(path, measure=timings)
    decision = d.decide(group, Case.of(group=group, **CASE))
    return decision.strategy, decision.chunks, decision.why, d.explain(group, Case.of(group=group, **CASE)), timings.calls


def test_fastest_wins_and_is_persisted(tmp_path):
    timings = Timings([{"bulk": 1.0, "chunkedx2": 0.7, "chunkedx4": 0.8}, {"bulk": 1.0, "chunkedx2": 0.75, "chunkedx4": 0.6}])
    strategy, chunks, why, text, calls = spawn(decide, 2, "local", args=(tmp_path / "d.json", timings))[0]
    assert (strategy, chunks) == ("chunked", 2)  # slowest-rank times: x2 0.75, x4 0.8
    assert why.startswith("25% faster than bulk") and "fused not considered: " in why
    assert "gemm_ar|64x32x16|float32|W2|LocalGroup|cpu" in text and "chunked x2" in text and "chunkedx2 750.000 ms" in text
    fresh = Timings(timings.per_rank)
    again = spawn(decide, 2, "local", args=(tmp_path / "d.json", fresh))
    assert [r[:2] for r in again] == [("chunked", 2)] * 2 and fresh.calls == 0, "a cached case is not measured again"


def test_bulk_stays_unless_clearly_faster(tmp_path):
    close = {"bulk": 1.0, "chunkedx2": 1.0 - MARGIN / 2, "chunkedx4": 1.5}
    strategy, _, why, _, _ = spawn(decide, 2, "local", args=(tmp_path / "d.json", Timings([close, close])))[0]
    assert strategy == "bulk" and why.startswith(f"nothing beat bulk by {MARGIN:.0%}")
    slower = {"bulk": 1.0, "chunkedx2": 1.2, "chunkedx4": 1.3}
    assert spawn(decide, 2, "local", args=(tmp_path / "e.json", Timings([slower, slower])))[0][0] == "bulk"


class WarmingUp(Timings):
    """Bulk, timed first, on a GPU still clocking up: slower than when timed again last."""

    def __call__(self, group, case, config):
        first_bulk = config.strategy == "bulk" and self.calls == 0
        return super().__call__(group, case, config) * (1.3 if first_bulk else 1.0)


def test_a_pick_must_beat_bulk_at_its_best(tmp_path):
    timings = WarmingUp([{"bulk": 1.0, "chunkedx2": 0.99, "chunkedx4": 1.1}])
    strategy, _, why, text, calls = spawn(decide, 1, "local", args=(tmp_path / "d.json", timings))[0]  # one rank: one count
    assert strategy == "bulk" and why.startswith(f"nothing beat bulk by {MARGIN:.0%}") and "bulk 1000.000 ms" in text
    assert calls == MEASURED


def partly_cached(group, root):
    """Only rank 0 has the case cached: both must measure, or rank 0 would skip the collective."""
    timings = Timings([{"bulk": 1.0, "chunkedx2": 0.5, "chunkedx4": 0.9}])
    d = Dispatcher(root / f"r{group.rank}.json", measure=timings)
    case = Case.of(group=group, **CASE)
    if group.rank == 0:
        d.decisions[case.key()] = dispatch.Decision("bulk", 4, {"bulk": 1.0}, "stale")
    return d.decide(group, case).strategy, timings.calls


def test_a_case_cached_on_some_ranks_only_is_measured_by_all(tmp_path):
    assert spawn(partly_cached, 2, "local", args=(tmp_path,)) == [("chunked", MEASURED)] * 2


def disagreeing_caches(group, root):
    """Each rank has a different decision cached (per-machine caches): they must measure again, together."""
    timings = Timings([{"bulk": 1.0, "chunkedx2": 0.9, "chunkedx4": 0.5}])
    d = Dispatcher(root / f"r{group.rank}.json", measure=timings)
    case = Case.of(group=group, **CASE)
    d.decisions[case.key()] = dispatch.Decision(["bulk", "chunked"][group.rank], 2, {"bulk": 1.0}, "stale")
    return d.decide(group, case).config(), timings.calls


def test_ranks_holding_different_cached_decisions_measure_again_and_agree(tmp_path):
    (a, calls_a), (b, calls_b) = spawn(disagreeing_caches, 2, "local", args=(tmp_path,))
    assert a == b and (a.strategy, a.chunks) == ("chunked", 4) and calls_a == calls_b == MEASURED


def shots_disagree(group, root):
    """Cached fused decisions that differ only in GEMM+AR's shots are different decisions."""
    timings = Timings([{"bulk": 1.0, "chunkedx2": 0.9, "chunkedx4": 0.5}])
    d = Dispatcher(root / f"r{group.rank}.json", measure=timings)
    case = Case.of(group=group, **CASE)
    d.decisions[case.key()] = dispatch.Decision("fused", 4, {"bulk": 1.0}, "stale", shots=1 + group.rank)
    return d.decide(group, case).config(), timings.calls


def test_cached_decisions_differing_in_shots_only_are_measured_again(tmp_path):
    (a, calls_a), (b, calls_b) = spawn(shots_disagree, 2, "local", args=(tmp_path,))
    assert a == b and (a.strategy, a.chunks, a.shots) == ("chunked", 4, 1) and calls_a == calls_b == MEASURED


def cached_two_shot(group, path):
    case = Case.of(group=group, **CASE)
    if group.rank == 0:
        dispatch._store(path, case.key(), dispatch.Decision("fused", 4, {"bulk": 1.0, "fused-two-shot": 0.5}, "50% faster than bulk", shots=2))
    group.barrier()
    d = Dispatcher(path, measure=Timings([{}]))  # a measurement would raise: the cached decision must serve
    return d.decide(group, case).config(), d.explain(group, case)


# fused runs on rank threads under the interpreter or on a GPU (on CPU tensors without the
# interpreter, the cached decision could not run, and would be measured again)
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.interpreter), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_cached_two_shot_decision_configures_two_shot(tmp_path, device):
    for config, text in spawn(cached_two_shot, 2, "local", device=device, args=(tmp_path / "d.json",)):
        assert (config.strategy, config.chunks, config.shots) == ("fused", 4, 2)
        assert ": fused (two-shot) (50% faster than bulk); measured fused-two-shot 500.000 ms, bulk 1000.000 ms" in text


def unrunnable_two_shot(group, root):
    """A cached two-shot decision where ranks may not share memory (gloo processes, which may span
    nodes) is measured again, not run (it would raise)."""
    timings = Timings([{"bulk": 1.0, "chunkedx2": 0.9, "chunkedx4": 0.5}])
    d = Dispatcher(root / f"r{group.rank}.json", measure=timings)
    case = Case.of(group=group, **CASE)
    d.decisions[case.key()] = dispatch.Decision("fused", 4, {"bulk": 1.0}, "measured on one node", shots=2)
    return d.decide(group, case).config().strategy, timings.calls


def test_a_cached_decision_that_cannot_run_here_is_measured_again(tmp_path):
    assert spawn(unrunnable_two_shot, 2, "gloo", args=(tmp_path,)) == [("chunked", MEASURED)] * 2


def test_cache_entries_this_version_cannot_read_are_left_out(tmp_path):
    path = tmp_path / "d.json"
    newer = {"strategy": "fused", "chunks": 4, "times": {"bulk": 1.0}, "why": "w", "measured": "m", "shots": 2, "added_later": 1}
    path.write_text(json.dumps({"newer": newer, "older": {"strategy": "bulk"}, "garbled": [1, 2]}))
    assert {k: d.config() for k, d in Dispatcher(path).decisions.items()} == {"newer": OverlapConfig(strategy="fused", shots=2)}


def candidate_labels(group):
    """The labels timed for a checked case; that fused is timed with the case's check."""
    checks = {checked: {label: c.check for label, c in dispatch.candidates_for(group, Case.of(group=group, **CASE, checked=checked))[0].items()
                        if c.strategy == "fused"} for checked in (True, False)}  # fmt: skip
    assert all(set(timed.values()) == {checked} for checked, timed in checks.items()), checks
    return sorted(dispatch.candidates_for(group, Case.of(group=group, **CASE))[0])


@pytest.mark.gpu
def test_two_shot_is_a_candidate_where_it_moves_fewer_bytes():
    one_shot = ["bulk", "chunkedx2", "chunkedx4", "fused"]
    assert spawn(candidate_labels, 2, "local", device="cuda") == [one_shot] * 2  # W = 2: the same bytes either way
    assert spawn(candidate_labels, 3, "local", device="cuda") == [one_shot + ["fused-two-shot"]] * 3


def checked_and_unchecked(group, path):
    timings = Timings([{"bulk": 1.0, "chunkedx2": 0.5, "chunkedx4": 0.9}])
    d = Dispatcher(path, measure=timings)
    keys = [Case.of(group=group, **CASE, checked=checked).key() for checked in (True, False)]
    for checked in (True, False):
        d.decide(group, Case.of(group=group, **CASE, checked=checked))
    return keys, timings.calls


def test_checked_and_unchecked_calls_are_decided_apart(tmp_path):
    """A checked fused call blocks the host until it is done: it is timed, and cached, apart."""
    (checked, unchecked), calls = spawn(checked_and_unchecked, 2, "local", args=(tmp_path / "d.json",))[0]
    assert checked.endswith("|checked") and unchecked.endswith("|unchecked") and checked[:-8] == unchecked[:-10]
    assert calls == 2 * MEASURED


def decided_then_alone(group, root):
    """After the first, collective, decision rank 0 asks again alone: were that collective, it would
    wait for rank 1 (at its barrier) and fail."""
    timings = Timings([{"bulk": 1.0, "chunkedx2": 0.5, "chunkedx4": 0.9}])
    d = Dispatcher(root / f"r{group.rank}.json", measure=timings)
    case = Case.of(group=group, **CASE)
    first = d.decide(group, case).strategy
    again = [d.decide(group, case).strategy for _ in range(3)] if group.rank == 0 else [first] * 3
    group.barrier()
    return first, again, timings.calls


def test_a_decided_case_is_served_without_the_peers(tmp_path):
    assert spawn(decided_then_alone, 2, "local", args=(tmp_path,), timeout=20) == [("chunked", ["chunked"] * 3, MEASURED)] * 2


def real_measurement(group):
    return measure_collectively(group, Case.of(group=group, **CASE), dispatch.OverlapConfig(strategy="chunked", chunks=2))


@pytest.mark.parametrize("transport", ["local", "gloo"])
def test_every_rank_measures_the_same_value(transport):
    values = spawn(real_measurement, 2, transport)
    assert values[0] > 0 and values == [values[0]] * 2


def auto_model(group, seed):
    ref = init_weights(LlamaForCausalLM(tiny()), seed)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(seed))
    model = parallelize(copy.deepcopy(ref), group, overlap="auto")
    with torch.no_grad():
        return (model(ids) - ref(ids)).abs().max().item(), torch.equal(model.generate(ids, 4), ref.generate(ids, 4))


def test_auto_layers_run_what_the_dispatcher_measured(tmp_path, seed, monkeypatch):
    path = tmp_path / "dispatch.json"
    monkeypatch.setattr(dispatch, "_DEFAULT", Dispatcher(path))  # the rank threads' one dispatcher
    results = spawn(auto_model, 2, "local", args=(seed,), timeout=120)
    assert all(err < 1e-5 and same for err, same in results)
    cached = Dispatcher(path).decisions
    assert {k.split("|")[0] for k in cached} == {"gemm_ar"} and len(cached) >= 2  # o_proj, down_proj; prefill and decode
    assert all("bulk" in d.times and "fused not considered" in d.why for d in cached.values())


def test_rank_threads_share_one_default_dispatcher(tmp_path, monkeypatch):
    """Made under a lock: threads that each made one would keep their agreements apart, and then
    disagree on whether a call is collective (a mismatch, or a hang)."""
    import threading

    monkeypatch.setenv("INTERLACE_DISPATCH_CACHE", str(tmp_path / "cache.json"))
    (tmp_path / "cache.json").write_text(json.dumps({f"k{i}": {"strategy": "bulk", "chunks": 1, "times": {}, "why": ""} for i in range(2000)}))
    monkeypatch.setattr(dispatch, "_DEFAULT", None)
    start, made = threading.Barrier(8), []

    def make():
        start.wait()
        made.append(dispatch.default_dispatcher())

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 8 and len({id(d) for d in made}) == 1
