"""Bad inputs at the hardware exporters' boundary, found by probing from outside: each is one
ValueError naming the argument, the shape and what was expected, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from spikemar.hardware import export_lava, export_nir, quantize, simulate
from spikemar.neurons import ATMN

SHAPE_MISMATCHES = [
    (  # a conv layer after a dense one
        lambda: nn.Sequential(nn.Linear(3, 4), ATMN(2.0, 0.5), nn.Conv2d(4, 2, 1), ATMN(2.0, 0.5)),
        (3,),
        r"input_shape: \(3,\) becomes \(4,\) at 1, which does not fit 2, a Conv2d",
    ),
    (  # a Linear after a conv layer, without a Flatten
        lambda: nn.Sequential(nn.Conv2d(1, 2, 3), ATMN(2.0, 0.5), nn.Linear(4, 3), ATMN(2.0, 0.5)),
        (1, 4, 4),
        r"input_shape: \(1, 4, 4\) becomes \(2, 2, 2\) at 1, which does not fit 2, a Linear "
        r"with 4 input features \(and no Flatten",
    ),
    (  # a flattened conv output of the wrong size
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3), ATMN(2.0, 0.5), nn.Flatten(), nn.Linear(5, 3), ATMN(2.0, 0.5)
        ),
        (1, 4, 4),
        r"becomes \(2, 2, 2\) at 1, which does not fit 3, a Linear with 5 input features",
    ),
    (  # a kernel larger than the image
        lambda: nn.Sequential(nn.Conv2d(1, 2, 5), ATMN(2.0, 0.5)),
        (1, 4, 4),
        r"input_shape: \(1, 4, 4\) does not fit 0 \(.*Kernel size",
    ),
]


@pytest.mark.parametrize("make, shape, message", SHAPE_MISMATCHES)
@pytest.mark.parametrize("export, suffix", [(export_lava, "h5"), (export_nir, "nir")])
def test_a_block_that_does_not_fit_the_one_before_it_is_named(
    tmp_path, make, shape, message, export, suffix
):
    with pytest.raises(ValueError, match=message):
        export(make(), tmp_path / f"net.{suffix}", shape)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("make, shape, message", SHAPE_MISMATCHES)
def test_the_fixed_point_and_float_models_name_a_block_that_does_not_fit(make, shape, message):
    inputs = torch.zeros(3, 1, *shape)
    message = message.replace("input_shape", "inputs")
    with pytest.raises(ValueError, match=message):
        quantize(make())(inputs)
    with pytest.raises(ValueError, match=message):
        simulate(make(), inputs)


def test_paths_of_the_wrong_type_and_bad_numbers_are_named(tmp_path):
    from spikemar.hardware import run_lava

    model = nn.Sequential(nn.Linear(3, 2, bias=False), ATMN(2.0, 0.5))
    for export in (export_lava, export_nir):
        with pytest.raises(TypeError, match="path: expected a str or path, got int"):
            export(model, 5, (3,))
    with pytest.raises(ValueError, match="dt: expected a finite number > 0, got True"):
        export_nir(model, tmp_path / "net.nir", (3,), dt=True)
    assert not list(tmp_path.iterdir())
    export_lava(model, tmp_path / "net.h5", (3,))
    with pytest.raises(TypeError, match="path: expected a str or path, got NoneType"):
        run_lava(None, torch.zeros(4, 3), 4)
    for timeout in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="timeout_s: expected a finite number of seconds"):
            run_lava(tmp_path / "net.h5", torch.zeros(4, 3), 4, timeout_s=timeout)


def test_a_lava_run_past_its_timeout_is_one_lava_run_error(lava, tmp_path):
    from spikemar.hardware import run_lava
    from spikemar.hardware.lava_export import LavaRunError

    model = nn.Sequential(nn.Linear(3, 2, bias=False), ATMN(2.0, 0.5))
    export_lava(model, tmp_path / "net.h5", (3,))
    with pytest.raises(LavaRunError, match=r"did not finish within timeout_s = 0.05 s"):
        run_lava(tmp_path / "net.h5", torch.zeros(4, 3), 4, timeout_s=0.05)
    assert not _processes_naming(tmp_path)  # Lava's processes went with the run


def _processes_naming(path) -> list[str]:
    """The command lines of running processes that mention ``path``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in text:
            found.append(text)
    return found


def test_a_voltage_readout_needs_a_cuba_output_layer(tmp_path):
    from spikemar.hardware import run_lava

    model = nn.Sequential(nn.Linear(3, 2, bias=False), ATMN(2.0, 0.5))
    export_lava(model, tmp_path / "net.h5", (3,))
    with pytest.raises(ValueError, match="readout: 'voltage' reads the voltage of a CUBA output"):
        run_lava(tmp_path / "net.h5", torch.zeros(4, 3), 4, readout="voltage")


@pytest.mark.slow
def test_the_lava_runtime_stops_lava_when_it_fails(lava, tmp_path):
    """Run directly (as DEVELOPERS.md shows), a voltage readout of an ATMN layer hung after the
    run (no voltage v) and left Lava's processes behind; now one error and nothing left."""
    import subprocess

    import numpy as np

    model = nn.Sequential(nn.Linear(3, 2, bias=False), ATMN(2.0, 0.5))
    export_lava(model, tmp_path / "net.h5", (3,))
    np.save(tmp_path / "in.npy", np.zeros((4, 3)))
    package = tmp_path / "path"
    package.mkdir()
    (package / "spikemar").symlink_to(Path(__import__("spikemar").__file__).parent)
    cmd = [str(lava), "-m", "spikemar.hardware.lava.runtime", str(tmp_path / "net.h5"),
           str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), "--voltage"]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, start_new_session=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(package)},
    )  # fmt: skip
    assert done.returncode != 0, done.stdout
    assert "readout: 'voltage' reads the voltage v of a CUBA output layer" in done.stderr
    assert not _processes_naming(tmp_path / "net.h5")


def test_run_lava_refuses_payloads_beyond_loihis_graded_spikes(tmp_path):
    """2^32 became 0 in Lava's int32 input (silent wrap-around) while the fixed-point model
    raised: a payload must fit Loihi 2's 24-bit graded spikes."""
    from spikemar.hardware import run_lava

    model = nn.Sequential(nn.Linear(3, 2, bias=False), ATMN(2.0, 0.5))
    export_lava(model, tmp_path / "net.h5", (3,))
    inputs = torch.zeros(4, 3)
    inputs[0, 1] = -(2.0**23)
    with pytest.raises(ValueError, match=r"inputs: a payload of 8388608 is outside Loihi 2's 24"):
        run_lava(tmp_path / "net.h5", inputs, 4)


def test_an_lti_coefficient_out_of_range_names_the_lti_cell():
    from spikemar.ssm.mixer import LTICell

    cell = LTICell(3)
    with torch.no_grad():
        cell.c.fill_(9.0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), cell, ATMN(2.0, 0.5))
    with pytest.raises(ValueError, match=r"^1: LTI coefficient c reaches 9; .* holds \|c\| < 8"):
        quantize(model)


def test_a_timed_out_lava_run_ends_the_processes_it_started(tmp_path, monkeypatch):
    """Lava runs its processes as children of the runner: a timeout that killed the runner
    alone left them running (seen after a hung run). A stand-in Lava Python that starts a child
    and waits shows the whole session going."""
    import os
    import stat
    import time

    from spikemar.hardware import run_lava
    from spikemar.hardware.lava_export import LavaRunError

    model = nn.Sequential(nn.Linear(3, 2, bias=False), ATMN(2.0, 0.5))
    export_lava(model, tmp_path / "net.h5", (3,))
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nsleep 300 &\necho $! > "{tmp_path}/child.pid"\nsleep 300\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("SPIKEMAR_LAVA_PYTHON", str(fake))
    with pytest.raises(LavaRunError, match="did not finish within timeout_s = 1 s"):
        run_lava(tmp_path / "net.h5", torch.zeros(4, 3), 4, timeout_s=1)
    child = int((tmp_path / "child.pid").read_text())
    for _ in range(50):
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break  # gone
        if state in ("Z", "X"):
            break  # killed, not yet reaped
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        pytest.fail("the Lava run's child process outlived the timeout")


def test_a_lava_python_that_is_a_folder_is_lava_unavailable(tmp_path, monkeypatch):
    from spikemar.hardware import LavaUnavailableError, run_lava

    model = nn.Sequential(nn.Linear(3, 2, bias=False), ATMN(2.0, 0.5))
    export_lava(model, tmp_path / "net.h5", (3,))
    monkeypatch.setenv("SPIKEMAR_LAVA_PYTHON", str(tmp_path))
    with pytest.raises(LavaUnavailableError, match=r"not an executable file .*SPIKEMAR_LAVA_PY"):
        run_lava(tmp_path / "net.h5", torch.zeros(4, 3), 4)


def test_netx_network_refuses_a_file_with_atmn_layers(tmp_path):
    from spikemar.hardware import run_lava

    model = nn.Sequential(nn.Linear(3, 2, bias=False), ATMN(2.0, 0.5))
    export_lava(model, tmp_path / "net.h5", (3,))
    with pytest.raises(ValueError, match=r"netx_network: .* CUBA layers only; .* \['ATMN'\]"):
        run_lava(tmp_path / "net.h5", torch.zeros(4, 3), 4, netx_network=True)


def test_a_cuba_neuron_built_on_meta_materialises():
    # torch's to_empty() passes `recurse`, which SpikingJelly's MemoryModule._apply does not take
    from spikemar.hardware.lif import CUBALIF

    with torch.device("meta"):
        neuron = CUBALIF(current_decay=0.5, voltage_decay=0.25, v_threshold=0.75)
    neuron.to_empty(device="cpu")
    want = CUBALIF(current_decay=0.5, voltage_decay=0.25, v_threshold=0.75)
    for x in torch.linspace(0.1, 0.9, 6)[:, None].expand(6, 4):
        assert torch.equal(neuron(x), want(x))
