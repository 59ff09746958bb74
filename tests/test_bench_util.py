"""What every benchmark names: the CPU, by model name and by family and model numbers."""

from __future__ import annotations

import platform

from crma_jax.train.bench.util import cpu_model

BLOCK = "processor\t: {n}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 207\nmodel name\t: Intel(R) Xeon(R) Processor\n"


def test_cpu_model_names_family_and_model_of_the_first_processor(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(BLOCK.format(n=0) + "\n" + BLOCK.format(n=1).replace("207", "143"))
    assert cpu_model(info) == "Intel(R) Xeon(R) Processor (family 6 model 207)"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\n")  # no numbers (some VMs, other architectures)
    assert cpu_model(info) == "Some CPU"
    assert cpu_model(tmp_path / "absent") == platform.machine()
