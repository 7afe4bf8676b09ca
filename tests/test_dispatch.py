"""The dispatcher behind overlap="auto": its choice, its margin, its cache and its agreement across
ranks. Synthetic timings test the decision logic; real timings test that every rank sees one value."""

import copy
import dataclasses
import json
import os
import warnings

import numpy as np
import pytest
import torch

from interlace import OverlapConfig, parallelize
from interlace.engine.comm import spawn
from interlace.engine.overlap import dispatch
from interlace.engine.overlap.dispatch import MARGIN, Case, Dispatcher, measure_collectively
from interlace.models import LlamaForCausalLM, init_weights, tiny

CASE = dict(pattern="gemm_ar", m=64, n=32, k=16, dtype=torch.float32)
LABELS = ("bulk", "chunkedx2", "chunkedx4")  # the candidates here (fused is not timed on CPU)
MEASURED = dispatch.ROUNDS * len(LABELS)  # timings per decision


class Timings:
    """A measurement stand-in: seconds per strategy label (per rank), counting calls."""

    def __init__(self, per_rank):
        self.per_rank, self.calls = per_rank, 0

    def __call__(self, group, case):
        return self.time

    def time(self, config):
        self.calls += 1
        label = config.strategy if config.strategy != "chunked" else f"chunkedx{config.chunks}"
        return max(t[label] for t in self.per_rank)  # what measure_collectively's timer returns: the slowest rank


def cached(strategy, chunks, why="cached", shots=1, times=None):
    """A decision this version would serve (it weighed every candidate there is here)."""
    times = times or dict.fromkeys(LABELS, 1.0)
    return dispatch.Decision(strategy, chunks, times, why, shots=shots, versions=dispatch.versions())


def decide(group, path, timings):
    d = Dispatcher(path, measure=timings)
    decision = d.decide(group, Case.of(group=group, **CASE))
    return decision.strategy, decision.chunks, decision.why, d.explain(group, Case.of(group=group, **CASE)), timings.calls


def test_fastest_wins_and_is_persisted(tmp_path):
    timings = Timings([{"bulk": 1.0, "chunkedx2": 0.7, "chunkedx4": 0.8}, {"bulk": 1.0, "chunkedx2": 0.75, "chunkedx4": 0.6}])
    strategy, chunks, why, text, calls = spawn(decide, 2, "local", args=(tmp_path / "d.json", timings))[0]
    assert (strategy, chunks) == ("chunked", 2)  # slowest-rank times: x2 0.75, x4 0.8
    assert why.startswith(f"25% faster than bulk (median of {dispatch.ROUNDS} rounds, faster in each)") and "fused not considered: " in why
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
    """Bulk, timed first, on a GPU still clocking up: slower than when timed again."""

    def time(self, config):
        first_bulk = config.strategy == "bulk" and self.calls == 0
        return super().time(config) * (1.3 if first_bulk else 1.0)


def test_a_slow_first_round_does_not_make_a_pick(tmp_path):
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
        d.decisions[case.key()] = cached("bulk", 4)
    return d.decide(group, case).strategy, timings.calls


def test_a_case_cached_on_some_ranks_only_is_measured_by_all(tmp_path):
    assert spawn(partly_cached, 2, "local", args=(tmp_path,)) == [("chunked", MEASURED)] * 2


def disagreeing_caches(group, root):
    """Each rank has a different decision cached (per-machine caches): they must measure again, together."""
    timings = Timings([{"bulk": 1.0, "chunkedx2": 0.9, "chunkedx4": 0.5}])
    d = Dispatcher(root / f"r{group.rank}.json", measure=timings)
    case = Case.of(group=group, **CASE)
    d.decisions[case.key()] = cached(["bulk", "chunked"][group.rank], 2)
    return d.decide(group, case).config(), timings.calls


def test_ranks_holding_different_cached_decisions_measure_again_and_agree(tmp_path):
    (a, calls_a), (b, calls_b) = spawn(disagreeing_caches, 2, "local", args=(tmp_path,))
    assert a == b and (a.strategy, a.chunks) == ("chunked", 4) and calls_a == calls_b == MEASURED


def shots_disagree(group, root):
    """Cached fused decisions that differ only in GEMM+AR's shots are different decisions."""
    timings = Timings([{"bulk": 1.0, "chunkedx2": 0.9, "chunkedx4": 0.5}])
    d = Dispatcher(root / f"r{group.rank}.json", measure=timings)
    case = Case.of(group=group, **CASE)
    d.decisions[case.key()] = cached("fused", 4, shots=1 + group.rank)
    return d.decide(group, case).config(), timings.calls


def test_cached_decisions_differing_in_shots_only_are_measured_again(tmp_path):
    (a, calls_a), (b, calls_b) = spawn(shots_disagree, 2, "local", args=(tmp_path,))
    assert a == b and (a.strategy, a.chunks, a.shots) == ("chunked", 4, 1) and calls_a == calls_b == MEASURED


def cached_two_shot(group, path):
    case = Case.of(group=group, **CASE)
    if group.rank == 0:
        times = {"bulk": 1.0, "chunkedx2": 0.9, "chunkedx4": 0.8, "fused": 0.6, "fused-two-shot": 0.5}
        dispatch._store(path, case.key(), cached("fused", 4, "50% faster than bulk", shots=2, times=times))
    group.barrier()
    d = Dispatcher(path, measure=Timings([{}]))  # a measurement would raise: the cached decision must serve
    return d.decide(group, case).config(), d.explain(group, case)


# fused runs on rank threads under the interpreter or on a GPU (on CPU tensors without the
# interpreter, the cached decision could not run, and would be measured again)
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.interpreter), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_cached_two_shot_decision_configures_two_shot(tmp_path, device):
    for config, text in spawn(cached_two_shot, 2, "local", device=device, args=(tmp_path / "d.json",)):
        assert (config.strategy, config.chunks, config.shots) == ("fused", 4, 2)
        assert (": fused (two-shot) (50% faster than bulk); measured fused-two-shot 500.000 ms, fused 600.000 ms, chunkedx4 800.000 ms, "
                "chunkedx2 900.000 ms, bulk 1000.000 ms") in text  # fmt: skip


def unrunnable_two_shot(group, root):
    """A cached two-shot decision where ranks may not share memory (gloo processes, which may span
    nodes) is measured again, not run (it would raise)."""
    timings = Timings([{"bulk": 1.0, "chunkedx2": 0.9, "chunkedx4": 0.5}])
    d = Dispatcher(root / f"r{group.rank}.json", measure=timings)
    case = Case.of(group=group, **CASE)
    d.decisions[case.key()] = cached("fused", 4, "measured on one node", shots=2)
    return d.decide(group, case).config().strategy, timings.calls


def test_a_cached_decision_that_cannot_run_here_is_measured_again(tmp_path):
    assert spawn(unrunnable_two_shot, 2, "gloo", args=(tmp_path,)) == [("chunked", MEASURED)] * 2


def test_cache_entries_this_version_cannot_read_are_left_out(tmp_path):
    """Refused at load, not when a call asks: an entry that cannot configure a call would raise on
    every call, or (held by one node only) on some ranks, leaving the others waiting."""
    path = tmp_path / "d.json"
    newer = {"strategy": "fused", "chunks": 4, "times": {"bulk": 1.0}, "why": "w", "measured": "m", "shots": 2, "added_later": 1}
    unusable = {"auto": {**newer, "strategy": "auto"}, "no chunks": {**newer, "chunks": 0}, "text chunks": {**newer, "chunks": "2"},
                "three shots": {**newer, "shots": 3}, "no times": {**newer, "times": None}}  # fmt: skip
    path.write_text(json.dumps({"newer": newer, "older": {"strategy": "bulk"}, "garbled": [1, 2], **unusable}))
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
    return measure_collectively(group, Case.of(group=group, **CASE))(dispatch.OverlapConfig(strategy="chunked", chunks=2))


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


def noisy_samples(rng, medians: dict[str, float], noise: float, rounds: int = dispatch.ROUNDS) -> dict[str, list[float]]:
    """Interleaved rounds: each round drifts all labels alike (``drift``), each sample has its own noise."""
    drift = rng.normal(0, noise, rounds)
    return {label: list(m * np.exp(drift + rng.normal(0, noise, rounds))) for label, m in medians.items()}


def test_noise_alone_hardly_ever_picks_a_strategy_and_a_real_gain_is_picked(seed):
    """Three candidates exactly as fast as bulk, 5% noise per sample: the fastest of one sample
    each is one of them three times in four; the rule, which a candidate no faster than bulk
    passes with odds of at most 1 in 128, picks one in well under 5% of decisions."""
    rng, trials = np.random.default_rng(seed), 2000
    same = dict.fromkeys(["bulk", "chunkedx2", "chunkedx4", "fused"], 1.0)
    picks = [dispatch.pick(noisy_samples(rng, same, 0.05))[0] for _ in range(trials)]
    assert sum(p != "bulk" for p in picks) < 0.05 * trials
    single = [min(s, key=s.get) for s in ({k: v[0] for k, v in noisy_samples(rng, same, 0.05).items()} for _ in range(200))]
    assert sum(p != "bulk" for p in single) > 100, "the noise here would fool a rule on one sample"
    slower = {"bulk": 1.0, "chunkedx2": 1.03, "chunkedx4": 1.05}
    assert sum(dispatch.pick(noisy_samples(rng, slower, 0.05))[0] != "bulk" for _ in range(trials)) < 0.005 * trials
    faster = {"bulk": 1.0, "chunkedx2": 0.85, "chunkedx4": 0.9}
    picks = [dispatch.pick(noisy_samples(rng, faster, 0.02))[0] for _ in range(trials)]
    assert sum(p == "chunkedx2" for p in picks) > 0.99 * trials


def test_picks_say_why_they_stayed_with_bulk():
    rounds = dispatch.ROUNDS
    mostly = {"bulk": [1.0] * rounds, "chunkedx2": [0.5] * (rounds - 1) + [1.5]}
    assert dispatch.pick(mostly) == ("bulk", f"chunkedx2 was 50% faster at the median but faster in only {rounds - 1} of {rounds} rounds")
    assert dispatch.pick({"bulk": [1.0] * rounds, "chunkedx2": [0.99] * rounds}) == ("bulk", f"nothing beat bulk by {MARGIN:.0%}")
    assert dispatch.pick({"bulk": [1.0] * rounds, "chunkedx2": [1.2] * rounds}) == ("bulk", "bulk was fastest")
    with pytest.raises(ValueError, match=r"bulk must take a positive time to compare against, got 0.0 s"):
        dispatch.pick({"bulk": [0.0] * rounds, "chunkedx2": [0.0] * rounds})


def measured_again(group, path, stale):
    timings = Timings([{"bulk": 1.0, "chunkedx2": 0.5, "chunkedx4": 0.9}])
    d = Dispatcher(path, measure=timings)
    case = Case.of(group=group, **CASE)
    d.decisions[case.key()] = stale
    return d.decide(group, case).strategy, timings.calls


@pytest.mark.parametrize("stale", ["other versions", "fewer candidates", "current"])
def test_a_decision_of_other_code_or_fewer_candidates_is_measured_again(tmp_path, stale):
    decision = {"other versions": dataclasses.replace(cached("bulk", 4), versions="interlace 0.0.1, torch 2.0.0"),
                "fewer candidates": cached("bulk", 4, times={"bulk": 1.0, "chunkedx2": 1.1}),  # chunked x4 is new
                "current": cached("bulk", 4)}[stale]  # fmt: skip
    expected = ("bulk", 0) if stale == "current" else ("chunked", MEASURED)
    assert spawn(measured_again, 2, "local", args=(tmp_path / "d.json", decision)) == [expected] * 2


def one_rank_lacks_a_candidate(group, path):
    """A process whose settings rule out a candidate (here: rank 1 cannot run chunked x4)."""
    if group.rank == 1:
        here = dispatch._candidates_here
        def without_x4(g, c):
            configs, why_not = here(g, c)
            return {k: v for k, v in configs.items() if k != "chunkedx4"}, why_not

        dispatch._candidates_here = without_x4
    timings = Timings([{"bulk": 1.0, "chunkedx2": 0.8, "chunkedx4": 0.5}])
    decision = Dispatcher(path, measure=timings).decide(group, Case.of(group=group, **CASE))
    return decision.label(), decision.why, sorted(decision.times), timings.calls


def test_ranks_time_only_the_candidates_every_rank_can_run(tmp_path):
    results = spawn(one_rank_lacks_a_candidate, 2, "gloo", args=(tmp_path / "d.json",), timeout=60)
    why = f"20% faster than bulk (median of {dispatch.ROUNDS} rounds, faster in each); fused not considered: "
    assert [(label, times, calls) for label, _, times, calls in results] == [("chunked x2", ["bulk", "chunkedx2"], 2 * dispatch.ROUNDS)] * 2
    assert results[0][1] == results[1][1] and results[0][1].startswith(why)
    assert results[0][1].endswith("; chunkedx4 left out: rank(s) [1] cannot time it")


def unwritable_on_rank_1(group, root):
    (root / "file").write_text("")
    path = root / ("file/d.json" if group.rank == 1 else f"r{group.rank}.json")  # under a file: cannot be written
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decision = Dispatcher(path, measure=Timings([{"bulk": 1.0, "chunkedx2": 0.5, "chunkedx4": 0.9}])).decide(group, Case.of(group=group, **CASE))
    group.barrier()  # both ranks are still in step
    return decision.strategy, [str(w.message) for w in caught]


def test_a_cache_that_cannot_be_written_is_said_and_the_ranks_go_on_together(tmp_path):
    (a, said_a), (b, said_b) = spawn(unwritable_on_rank_1, 2, "gloo", args=(tmp_path,), timeout=60)
    assert a == b == "chunked" and said_a == []
    assert len(said_b) == 1 and said_b[0].startswith(f"interlace: the dispatch cache {tmp_path}/file/d.json could not be written (")
    assert said_b[0].endswith("gemm_ar|64x32x16|float32|W2|DistGroup/gloo|cpu" + str(os.cpu_count()) + "|checked is decided for this process only")


def inputs_fail_on_rank_1(group):
    if group.rank == 1:
        def out_of_memory(g, c):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

        dispatch._call_of = out_of_memory
    try:
        measure_collectively(group, Case.of(group=group, **CASE))
    except RuntimeError as error:
        return str(error)


def test_a_rank_that_cannot_make_the_inputs_fails_every_rank_at_once():
    what = "making the inputs to time gemm_ar|64x32x16|float32|W2|DistGroup/gloo|cpu" + str(os.cpu_count()) + "|checked failed on rank(s) [1]"
    assert spawn(inputs_fail_on_rank_1, 2, "gloo", timeout=30) == [
        f"rank 0: {what}", f"rank 1: {what}: OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB"]
