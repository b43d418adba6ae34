"""LM distillation under Lightning's FSDPStrategy (issue 17).

Lightning refuses FSDP on CPU, so the fast test pins that refusal as a one-line error; the slow test runs the GPU
check script's CPU path (benchmarks/gpu_fsdp_check.py --accelerator cpu: Lightning's FSDPStrategy with
``device_id=cpu``, gloo, two processes) and checks that the sharded teacher stays frozen and unchanged.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from kd_lightning.errors import KDConfigError
from tests.helpers.cli import QUICKSTART_ARGS, REPO, fit


def test_fsdp_on_cpu_is_refused_with_a_one_line_error() -> None:
    with pytest.raises(KDConfigError) as info:
        fit([*QUICKSTART_ARGS, "--trainer.strategy=fsdp", "--trainer.accelerator=cpu"])
    message = str(info.value)
    assert message.startswith("trainer.strategy: The strategy `fsdp` requires a GPU accelerator")
    assert "use trainer.strategy ddp on CPU" in message
    assert "\n" not in message


@pytest.mark.ddp
@pytest.mark.slow  # ~30-60 s: two spawned processes importing transformers
def test_two_process_fsdp_lm_distillation_keeps_the_teacher_frozen() -> None:
    pytest.importorskip("transformers")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_fsdp_check.py"), "--accelerator", "cpu", "--devices", "2"],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert output.count("FSDP CHECK OK") == 2, output[-4000:]
    assert "world 2, 5 FSDP units" in output  # root + one unit per decoder layer (2 student + 2 teacher)
