"""`--engine spark`: the same store as the local runner (folder, parquet and webdataset sources),
a task whose Python worker is killed is retried by Spark with the same bytes, a second driver
is refused, and a finished store reads into a Spark DataFrame through its parquet export.

One real Spark session for the module: `local[2,2]` (2 task slots, a task may fail once),
bound to 127.0.0.1, UI off, stopped after."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_extract import cli_args, make_images, tiny_config

from vlm_encoder import FeatureStore
from vlm_encoder.cli import main
from vlm_encoder.extract import run_extraction
from vlm_encoder.extract.engines.spark import SparkEngine, spark_dataframe
from vlm_encoder.locks import DirectoryLock

pyspark = pytest.importorskip("pyspark")
if not (os.environ.get("JAVA_HOME") or shutil.which("java")):  # where pyspark's launcher looks for it
    pytest.skip("Spark needs Java 17 or later (no java on PATH, JAVA_HOME unset)", allow_module_level=True)

MASTER = "local[2,2]"  # 2 task slots; spark.task.maxFailures 2: a task may fail once


@pytest.fixture(scope="module")
def spark():
    """A local Spark session on loopback, its Python workers on this interpreter."""
    from pyspark.sql import SparkSession

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
        patch.setenv("PYSPARK_PYTHON", sys.executable)
        session = (
            SparkSession.builder.master(MASTER).appName("test_extract_spark")
            .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
            .getOrCreate()
        )
        session.sparkContext.setLogLevel("FATAL")  # a killed worker's task failure is expected here
        try:
            yield session
        finally:
            session.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """The same images as a folder (with 4 broken files), a parquet file and a webdataset tar."""
    root = tmp_path_factory.mktemp("spark_data")
    folder = make_images(root / "images", 14, bad=True)
    good = sorted(p for p in folder.iterdir() if p.name.startswith("img_"))
    from datasets import Dataset, Image

    table = Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": None} for p in good]})
    table.cast_column("image", Image()).to_parquet(str(root / "images.parquet"))
    with tarfile.open(root / "shard-00000.tar", "w") as tar:
        for i, path in enumerate(good):
            payload = path.read_bytes()
            info = tarfile.TarInfo(f"{i:06d}.jpg")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return {"folder": str(folder), "parquet": str(root / "images.parquet"), "webdataset": str(root / "shard-*.tar")}


def store_files(out: Path) -> dict[str, object]:
    """Everything a store holds that does not depend on who wrote it or when: the shard files'
    bytes, the sidecars without their writer, failures.jsonl, the manifest without its date."""
    files: dict[str, object] = {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.safetensors"))}
    for path in sorted(out.glob("shard-*.json")):
        files[path.name] = {k: v for k, v in json.loads(path.read_text()).items() if k != "writer"}
    files["failures.jsonl"] = (out / "failures.jsonl").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    files["manifest.json"] = {k: v for k, v in manifest.items() if k != "created"}
    return files


@pytest.fixture(scope="module")
def local(data, tmp_path_factory) -> dict[str, Path]:
    """The local runner's store of each source."""
    stores = {}
    for source, spec in data.items():
        tmp = tmp_path_factory.mktemp(f"local_{source}")
        assert run_extraction(tiny_config(tmp, spec)).complete
        stores[source] = tmp / "out"
    return stores


@pytest.mark.parametrize("source", ["folder", "parquet", "webdataset"])
def test_spark_store_equals_the_local_runner(spark, data, local, tmp_path, source):
    summary = SparkEngine().run(tiny_config(tmp_path, data[source]))
    reference = FeatureStore(local[source])
    assert summary.complete and (summary.rows_written, summary.rows_failed) == (len(reference), len(reference.failures))
    assert summary.shards_this_run == reference.manifest["num_shards"]
    assert store_files(tmp_path / "out") == store_files(local[source])
    writers = {json.loads(p.read_text())["writer"]["engine"] for p in (tmp_path / "out").glob("shard-*.json")}
    assert writers == {"spark"}
    if source == "folder":  # run again: every shard is committed and intact, so every task skips its shard
        again = SparkEngine().run(tiny_config(tmp_path, data[source]))
        assert (again.shards_this_run, again.shards_kept) == (0, summary.shards_this_run)


def _children(pids: set[int]) -> set[int]:
    """The processes whose parent is in `pids` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent in pids:
                found.add(int(entry.name))
    return found


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return -1
    return int(fields[11]) + int(fields[12])  # utime + stime


def _busy_python_worker(deadline: float) -> int | None:
    """A Spark Python worker of this test's session (this process -> JVM -> pyspark.daemon ->
    worker) that is burning CPU, i.e. running a task, or None by `deadline`."""
    previous: dict[int, int] = {}
    streak: dict[int, int] = {}  # polls in a row each worker used CPU in
    while time.monotonic() < deadline:
        workers = _children(_children(_children({os.getpid()})))
        ticks = {pid: _cpu_ticks(pid) for pid in workers}
        streak = {pid: streak.get(pid, 0) + 1 for pid, t in ticks.items() if 0 <= previous.get(pid, t) < t}
        busy = [pid for pid, n in streak.items() if n >= 2]
        if busy:
            return busy[0]
        previous = ticks
        time.sleep(0.03)
    return None


LARGE = {"max_pixels": None, "shard_size": 2, "select": ("cls", "pooled")}  # 6 shards of 2 large images


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> tuple[Path, Path]:
    """12 images large enough that decoding keeps a worker busy a while, and their local store."""
    from PIL import Image

    root = tmp_path_factory.mktemp("large")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (700 + 17 * i, 900, 3), dtype=np.uint8)).save(images / f"{i:02d}.jpg")
    assert run_extraction(tiny_config(root, images, out="local", **LARGE)).complete
    return images, root / "local"


def test_a_task_whose_worker_is_killed_is_retried_with_the_same_bytes(spark, large, tmp_path):
    """SIGKILL of a Python worker while it runs a shard: Spark retries the task (local[2,2]) and
    the store equals the local runner's."""
    images, reference = large
    context = spark.sparkContext
    killed: list[int] = []

    def kill_a_busy_worker() -> None:
        pid = _busy_python_worker(time.monotonic() + 120)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_a_busy_worker)
    context.setJobGroup("killed-worker", "a Python worker is killed during this job")
    killer.start()
    try:
        summary = SparkEngine().run(tiny_config(tmp_path, images, **LARGE))
    finally:
        killer.join()
        context.setLocalProperty("spark.jobGroup.id", None)
    assert killed, "no Python worker was seen running a task"
    tracker = context.statusTracker()
    stages = [s for j in tracker.getJobIdsForGroup("killed-worker") for s in tracker.getJobInfo(j).stageIds]
    assert sum(tracker.getStageInfo(s).numFailedTasks for s in stages) == 1
    assert summary.complete and summary.shards_this_run == 6
    assert store_files(tmp_path / "out") == store_files(reference)


def _committed(out: Path) -> dict[str, tuple[int, int]]:
    """Committed shard files (a sidecar written) -> (inode, mtime): a rewrite changes both."""
    found = {}
    for sidecar in out.glob("shard-*.json"):
        stat = sidecar.with_suffix(".safetensors").stat()
        found[sidecar.with_suffix(".safetensors").name] = (stat.st_ino, stat.st_mtime_ns)
    return found


@pytest.mark.slow  # two Spark sessions started by the command (~40 s)
def test_a_killed_driver_then_the_same_command_keeps_committed_shards(large, tmp_path):
    """`vlm-encoder extract --engine spark --workers 2` (its own local[2] session) SIGKILLed after
    its first commits; the same command keeps them, does the rest, and equals the local store."""
    images, reference = large
    out = tmp_path / "out"
    from PIL import Image

    command = [sys.executable, "-m", "vlm_encoder.cli", *cli_args(images, out, "--engine", "spark", "--workers", "2",
               "--shard-size", "2", "--select", "cls,pooled", "--num-workers", "0")]
    command[command.index("--max-pixels") + 1] = str(Image.MAX_IMAGE_PIXELS)  # LARGE's default, as in its fingerprint
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYSPARK_PYTHON", None)  # the engine runs its workers with this interpreter itself
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (out.exists() and _committed(out)):
            assert first.poll() is None, first.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the driver committed no shard in 180 s"
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    for _ in range(200):  # its JVM and Python workers end with it (the JVM exits when its stdin closes)
        if not _group_alive(first.pid):
            break
        time.sleep(0.1)
    else:
        os.killpg(first.pid, signal.SIGKILL)
        pytest.fail("the killed driver's JVM or Python workers outlived it by 20 s")
    kept = _committed(out)
    assert 1 <= len(kept) < 6, kept
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "12 rows written, 0 failed, of 12 (complete)" in rerun.stdout
    assert f"{len(kept)} shards kept" in rerun.stdout
    assert {name: v for name, v in _committed(out).items() if name in kept} == kept
    assert store_files(out) == store_files(reference)



@pytest.mark.slow  # spark-submit starts its own JVM and session (~40 s)
def test_spark_submit_runs_a_driver_script_in_its_session(large, tmp_path):
    """Under `spark-submit`, `SparkEngine().run` uses the session spark-submit set up (its
    --master), and the store equals the local runner's."""
    images, reference = large
    script = tmp_path / "extract_job.py"
    config = dict(tiny_config(tmp_path, images, **LARGE).to_dict(), out=str(tmp_path / "out"))
    script.write_text(
        "from pyspark.sql import SparkSession\n"
        "from vlm_encoder.extract import ExtractConfig\n"
        "from vlm_encoder.extract.engines import SparkEngine\n"
        f"print(SparkEngine().run(ExtractConfig.from_dict({config!r})))\n"
        "print('master', SparkSession.getActiveSession().sparkContext.master)\n"
    )
    submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    run = subprocess.run([str(submit), "--master", "local[2]", "--conf", "spark.driver.host=127.0.0.1",
                          "--conf", "spark.driver.bindAddress=127.0.0.1", "--conf", "spark.ui.enabled=false",
                          str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "12 rows written, 0 failed, of 12 (complete)" in run.stdout and "master local[2]" in run.stdout
    assert store_files(tmp_path / "out") == store_files(reference)


def _group_alive(group: int) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[3]) == group and fields[0] != "Z":
                return True
    return False


def test_cli_engine_spark_and_a_second_driver_refused(spark, data, tmp_path, capsys):
    """`vlm-encoder extract --engine spark` in the session of this process; while another
    driver holds --out, a second one is refused in one line naming it, before any Spark job."""
    out = tmp_path / "cli"
    assert main(cli_args(Path(data["folder"]), out, "--engine", "spark")) == 0
    assert "14 rows written, 4 failed, of 18 (complete)" in capsys.readouterr().out
    holder = DirectoryLock(out, what="extraction").acquire()
    jobs = len(spark.sparkContext.statusTracker().getJobIdsForGroup())
    try:
        assert main(cli_args(Path(data["folder"]), out, "--engine", "spark")) == 2
    finally:
        holder.release()
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"is in use by extraction pid {os.getpid()}" in error, error
    assert len(spark.sparkContext.statusTracker().getJobIdsForGroup()) == jobs
    # An active session decides its own master: --workers / --spark-master are refused, not ignored.
    assert main(cli_args(Path(data["folder"]), out, "--engine", "spark", "--workers", "3")) == 2
    assert "a SparkSession on local[2,2] is active" in capsys.readouterr().err


def test_a_shard_failing_every_attempt_stops_the_cli_in_one_line(spark, data, tmp_path, capsys):
    """A shard that cannot be committed (a directory stands at its path) fails both of the
    session's attempts: the command exits 2 with one line naming the worker's error, and a
    rerun after the cause is gone finishes the store."""
    out = tmp_path / "blocked"
    (out / "shard-00001.safetensors").mkdir(parents=True)
    args = cli_args(Path(data["folder"]), out, "--engine", "spark", "--shard-size", "8")
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert "failed on every attempt" in error and "IsADirectoryError" in error, error
    (out / "shard-00001.safetensors").rmdir()
    assert main(args) == 0
    assert "(complete)" in capsys.readouterr().out


def test_a_store_reads_into_a_spark_dataframe(spark, local, tmp_path):
    """Spark reads the store's parquet export itself: the same row ids and feature values."""
    store = FeatureStore(local["folder"])
    frame = spark_dataframe(store, tmp_path / "features.parquet", layers=[-1], kinds=["cls", "patch"])
    assert frame.columns == ["row_id", "layer2.cls", "layer2.patch"]
    rows = sorted(frame.collect(), key=lambda r: r["row_id"])
    assert [r["row_id"] for r in rows] == store.row_ids.tolist()
    np.testing.assert_array_equal(np.array([r["layer2.cls"] for r in rows], dtype=np.float32),
                                  store[-1, "cls"][:].numpy())
    np.testing.assert_array_equal(np.array([r["layer2.patch"] for r in rows], dtype=np.float32),
                                  store[-1, "patch"][:].numpy())
    assert dict(frame.dtypes)["layer2.patch"] == "array<array<float>>"


def test_without_pyspark_the_engine_is_refused_in_one_line(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyspark", None)  # as if the extra were not installed
    assert main(cli_args(Path(data["folder"]), tmp_path / "out", "--engine", "spark")) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "pip install 'vlm-encoder[spark]'" in error, error


def test_spark_options_out_of_place_are_one_line(data, tmp_path, capsys):
    base = cli_args(Path(data["folder"]), tmp_path / "out")
    assert main([*base, "--spark-master", "local[2]"]) == 2  # --engine local
    assert "--spark-master applies to --engine spark, not local" in capsys.readouterr().err
    assert main([*base, "--engine", "spark", "--spark-master", "local[2]", "--workers", "2"]) == 2
    assert "--workers sets the width of the default local master" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
