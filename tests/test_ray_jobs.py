"""`--ray`: eval problems spread over a local Ray cluster give the bits of a single process.

One local cluster (2 CPUs) for the whole module: starting one takes seconds and memory. Each worker
holds one engine on the tiny random-weight Llama, on one torch thread, like the single-process reference.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
ray = pytest.importorskip("ray")

from tiny_models import make_tiny_model  # noqa: E402

from ditto import LLM  # noqa: E402
from ditto.eval.ray_eval import run_eval_ray, units  # noqa: E402
from ditto.eval.runner import EvalConfig, load_results, run_eval  # noqa: E402
from ditto.ray_pool import KILL_HOOK_ENV  # noqa: E402

PROBLEMS = 6


@pytest.fixture(scope="module")
def cluster():
    ray.init(
        address="local",  # a private cluster, even when another one runs on this machine
        num_cpus=2,
        object_store_memory=128 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("ray-tiny") / "llama", "llama")


def _config(**kw) -> EvalConfig:
    base = dict(task="arith", limit=PROBLEMS, max_tokens=8, temperature=0.7, seed=3, n=2, grader_workers=1)
    return EvalConfig(**(base | {"keep_tokens": True} | kw))


def _factory(path: Path, determinism: str = "batch_invariant"):
    numerics = "integer" if determinism == "exact" else "fp32"
    return partial(LLM, str(path), numerics=numerics, determinism=determinism, progress=False, threads=1)


def _tensors(out: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per problem: its samples' token ids and logprobs, each sample padded to one row."""
    recs = load_results(out / "results.jsonl")
    assert len(recs) == len({r["id"] for r in recs}), "a problem recorded twice"
    res = {}
    for r in recs:
        ids = [torch.tensor(s["token_ids"]) for s in r["samples"]]
        lps = [torch.tensor(s["logprobs"], dtype=torch.float64) for s in r["samples"]]
        res[r["id"]] = (torch.nn.utils.rnn.pad_sequence(ids), torch.nn.utils.rnn.pad_sequence(lps))
    return res


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for pid in a:
        assert torch.equal(a[pid][0], b[pid][0]), pid
        assert torch.equal(a[pid][1], b[pid][1]), pid


def _single(tiny: Path, out: Path, determinism: str) -> dict:
    """The single process: every problem in one generate call, one torch thread."""
    before = torch.get_num_threads()
    run_eval(_factory(tiny, determinism)(), _config(batch_problems=PROBLEMS), out, progress=False, report=False)
    torch.set_num_threads(before)
    return _tensors(out)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> dict:
    return _single(tiny, tmp_path_factory.mktemp("single"), "batch_invariant")


def test_units_are_fixed_and_skip_finished_problems():
    probs = [type("P", (), {"id": f"p{i}"})() for i in range(5)]
    keys = [(k, [p.id for p in ps]) for k, ps in units(probs, 2, {"p0", "p1", "p3"})]
    assert keys == [("u00001", ["p2"]), ("u00002", ["p4"])]


@pytest.mark.parametrize("workers", [1, 2])
def test_one_and_two_workers_give_the_single_process_bits(cluster, tiny, reference, tmp_path, workers):
    summary = run_eval_ray(_factory(tiny), _config(batch_problems=2), tmp_path, workers=workers, progress=False)
    _same(_tensors(tmp_path), reference)
    assert summary["problems"] == PROBLEMS
    session = json.loads((tmp_path / "manifest.json").read_text())["sessions"][-1]
    assert session["ray"]["workers"] == workers and session["ray"]["units"] == 3
    assert (tmp_path / "report.md").exists()


def test_exact_two_workers_give_the_single_process_bits(cluster, tiny, tmp_path):
    single = _single(tiny, tmp_path / "single", "exact")
    run_eval_ray(_factory(tiny, "exact"), _config(batch_problems=2), tmp_path / "ray", workers=2, progress=False)
    _same(_tensors(tmp_path / "ray"), single)


def test_a_killed_worker_s_unit_is_redone_once(cluster, tiny, reference, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_HOOK_ENV, f"u00001:{marker}")
    out = tmp_path / "run"
    run_eval_ray(_factory(tiny), _config(batch_problems=2), out, workers=2, progress=False, report=False)
    assert marker.exists()  # the worker did die, after generating its unit
    session = json.loads((out / "manifest.json").read_text())["sessions"][-1]
    assert session["ray"]["worker_deaths"] == 1 and session["ray"]["units_redone"] == ["u00001"]
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == PROBLEMS  # nothing duplicated, nothing lost
    _same(_tensors(out), reference)


def test_a_resumed_job_skips_finished_units(cluster, tiny, reference, tmp_path):
    run_eval_ray(_factory(tiny), _config(batch_problems=2, limit=3), tmp_path, workers=1, progress=False, report=False)
    run_eval_ray(_factory(tiny), _config(batch_problems=2), tmp_path, workers=2, progress=False, report=False)
    sessions = json.loads((tmp_path / "manifest.json").read_text())["sessions"]
    assert sessions[-1]["resumed_with"] == 3
    assert sessions[-1]["ray"]["units"] == 2  # unit 0 is done; unit 1 runs only its missing problem
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == PROBLEMS
    _same(_tensors(tmp_path), reference)


def test_repro_configs_over_two_workers_one_killed(cluster, tiny, tmp_path, monkeypatch):
    from ditto.repro.runner import RunConfig, Workload, load_study, run_config, run_study

    workload = Workload(model=str(tiny), task="arith-easy", limit=4, max_tokens=8).prepare()
    configs = [RunConfig("ditto", "fp32", "batch_invariant", b, 1) for b in (1, 4)]
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_HOOK_ENV, f"{configs[1].name}:{marker}")
    study = run_study(workload, configs, tmp_path / "ray", report=False, ray={"address": "local", "workers": 2})
    assert marker.exists() and study["ray"]["worker_deaths"] == 1 and study["ray"]["units_redone"] == [configs[1].name]
    assert sorted(study["ran"]) == sorted(c.name for c in configs)
    before = torch.get_num_threads()
    run_config(configs[0], workload, tmp_path / "local")  # the same config in this process
    torch.set_num_threads(before)
    _, results, _ = load_study(tmp_path / "ray")
    local = load_study_config(tmp_path / "local", configs[0].name)
    for c in configs:
        assert results[c.name] == local, c.name
    again = run_study(workload, configs, tmp_path / "ray", report=False, ray={"address": "local", "workers": 2})
    assert again["ran"] == [] and again["reused"] == [c.name for c in configs]


def load_study_config(out: Path, name: str) -> dict:
    from ditto.repro.runner import load_config_results

    return load_config_results(out / "configs" / name)


def test_verify_over_ray_gives_the_single_process_verdicts(cluster, tiny, tmp_path, capsys, monkeypatch):
    import dataclasses

    from ditto import SamplingParams
    from ditto.cli import main
    from ditto.ray_pool import WorkerPool
    from ditto.verify.build import receipt_for

    before = torch.get_num_threads()
    llm = _factory(tiny)()
    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=6, ignore_eos=True) for i in range(10)]
    outs = llm.generate(["What is 2+2?", "Name a colour."] * 5, params)
    torch.set_num_threads(before)
    paths = []
    for i, (o, p) in enumerate(zip(outs, params)):
        r = receipt_for(llm, o, o.outputs[0], p)
        if i == 9:  # a forged claim, resealed: only the replay can tell
            r = dataclasses.replace(r, output_logprobs=[x + 1e-3 for x in r.output_logprobs]).seal()
        r.save(tmp_path / f"r{i}.json")
        paths.append(str(tmp_path / f"r{i}.json"))

    def verdicts(*flags: str) -> tuple[int, dict]:
        rc = main(["verify", "--json", *flags, *paths])
        doc = json.loads(capsys.readouterr().out)
        return rc, {d["file"]: (d["status"], d.get("reason")) for d in doc["results"]}

    rc, single = verdicts()
    assert rc == 1 and [single[p][0] for p in paths] == ["exact"] * 9 + ["inconsistent"]
    sent, real_map = [], WorkerPool.map

    def counted_map(pool, fn, units):
        sent.extend(units)
        return real_map(pool, fn, units)

    monkeypatch.setattr(WorkerPool, "map", counted_map)
    assert verdicts("--ray", "--ray-workers", "2") == (rc, single)
    assert len(sent) == 2  # two units of receipts went to the cluster


def test_ray_flags_are_checked_before_anything_starts(capsys):
    from ditto.cli import main

    assert main(["eval", "--task", "arith", "--ray-workers", "2"]) == 2
    assert "--ray-workers: must be used with --ray" in capsys.readouterr().err
    assert main(["eval", "--task", "arith", "--ray", "--ray-workers", "0"]) == 2
    assert "--ray-workers: must be a positive integer" in capsys.readouterr().err
    assert main(["eval", "--task", "arith", "--ray", "--strategy", "greedy"]) == 2
    assert "not with --strategy" in capsys.readouterr().err
