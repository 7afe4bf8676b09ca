"""The README's runnable examples run as written and compute what they say: each is executed from
the README's own text (so an API change that breaks one fails here), and its results are checked
against an unsharded model or a closed form."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def example(marker: str) -> str:
    """The README's one Python block that contains ``marker``."""
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M) if marker in b]
    assert len(blocks) == 1, f"README.md: {len(blocks)} Python blocks contain {marker!r}, expected 1"
    return blocks[0]


def run(source: str) -> dict:
    namespace = {"__name__": "__main__"}  # as a script: the examples start their ranks under that guard
    exec(compile(source, str(README), "exec"), namespace)
    return namespace


def test_short_example_generates_the_unsharded_models_tokens():
    pytest.importorskip("transformers")
    ns = run(example("LlamaForCausalLM"))
    expected = ns["model"].generate(ns["ids"], max_new_tokens=16, do_sample=False)
    assert len(ns["tokens"]) == 2
    for rank, tokens in enumerate(ns["tokens"]):
        assert torch.equal(tokens, expected), f"rank {rank}: {tokens.tolist()} != unsharded {expected.tolist()}"


def test_communication_example_gathers_and_reduces():
    ns = run(example("all_reduce_async"))
    world_size = 4
    assert len(ns["results"]) == world_size
    x = torch.cat([torch.full((2, 4), float(r)) for r in range(world_size)])
    for rank, (reduced, y) in enumerate(ns["results"]):
        torch.testing.assert_close(reduced, torch.full((2, 4), float(sum(range(world_size)))), rtol=0, atol=0, msg=f"rank {rank}")
        torch.testing.assert_close(y, x @ x.T, rtol=0, atol=0, msg=f"rank {rank}")


def test_communication_example_runs_as_a_script_over_processes(tmp_path):
    """What its comment offers: "gloo" in place of "local", the example saved as a script and run."""
    import os
    import subprocess
    import sys

    source = example("all_reduce_async")
    assert source.count('backend="local"') == 1
    script = tmp_path / "step.py"
    script.write_text(source.replace('backend="local"', 'backend="gloo"') + "    print([float(r[0].sum()) for r in results])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(README.parent), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout == f"{[8.0 * sum(range(4))] * 4}\n", done.stdout + done.stderr
