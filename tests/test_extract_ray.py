"""`vlm-encoder extract --engine ray` on a real local Ray cluster (one per module, loopback only):
the same bytes as the local runner from a folder, a parquet file and webdataset shards; a worker
SIGKILLed in the middle of a shard is restarted by Ray and only that shard is redone; a second
driver on the same --out is refused in one line; a SIGKILLed driver's committed shards are kept
by the same command run again; a finished store into a Ray Dataset through Arrow."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: it then keeps to 127.0.0.1
ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")  # a dependency of Ray

from test_extract import PYTHON, TINY_ARGS, checksums, make_images, tiny_config  # noqa: E402

from vlm_encoder import FeatureStore  # noqa: E402
from vlm_encoder.cli import main  # noqa: E402
from vlm_encoder.extract import run_extraction  # noqa: E402
from vlm_encoder.extract.engines import RayEngine, ray_dataset  # noqa: E402

BIG_ROWS, BIG_SHARD = 1600, 400  # 4 shards, each long enough (by its size) to be killed in


@pytest.fixture(scope="module")
def ray_node():
    """A Ray cluster of this machine on 127.0.0.1 with 2 CPUs (its `address_info`)."""
    # address="local": a new cluster of this test's own, even where another one runs on the machine
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                       object_store_memory=100 << 20, logging_level="WARNING", log_to_driver=False)
    yield context.address_info
    ray.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_node) -> str:
    """The cluster's address, for other drivers."""
    return ray_node["gcs_address"]


@pytest.fixture(scope="module")
def session(ray_node) -> str:
    """The name of the cluster's session (its raylet, the parent of its workers, carries it)."""
    return Path(ray_node["session_dir"]).name


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data") / "images", 10)


def _sources(root: Path, images: Path) -> dict[str, Path]:
    """The same images as a folder (with broken files), a parquet file and webdataset shards."""
    from datasets import Dataset, Image

    paths = sorted(images.iterdir())
    folder = make_images(root / "folder", 10, bad=True)
    Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": None} for p in paths]}).cast_column(
        "image", Image()).to_parquet(str(root / "images.parquet"))
    (root / "wds").mkdir()
    for shard, part in enumerate((paths[:6], paths[6:])):
        with tarfile.open(root / "wds" / f"shard-{shard:05d}.tar", "w") as tar:
            for i, path in enumerate(part, start=shard * 6):
                info = tarfile.TarInfo(f"{i:06d}.jpg")
                info.size = path.stat().st_size
                tar.addfile(info, io.BytesIO(path.read_bytes()))
    return {"folder": folder, "parquet": root / "images.parquet", "webdataset": root / "wds" / "shard-*.tar"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, images) -> dict[str, Path]:
    return _sources(tmp_path_factory.mktemp("sources"), images)


@pytest.fixture(scope="module")
def big(tmp_path_factory, images) -> tuple[Path, Path]:
    """A list file of `BIG_ROWS` rows (the 10 images over and over) and its local run."""
    root = tmp_path_factory.mktemp("big")
    names = sorted(p.name for p in images.iterdir())
    listing = root / "list.txt"
    listing.write_text("".join(f"{images / names[i % len(names)]}\n" for i in range(BIG_ROWS)))
    assert run_extraction(big_config(root, listing, "reference")).complete
    return listing, root / "reference"


def big_config(root: Path, listing: Path, out: str):
    return tiny_config(root, listing, out=out, shard_size=BIG_SHARD, batch_size=32, select=("cls", "patch"))


def comparable(out: Path) -> dict:
    """The manifest without what may differ between runners: creation time, timings, writers."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("created", None)
    manifest["shards"] = [{k: v for k, v in s.items() if k not in ("writer", "seconds", "committed")}
                          for s in manifest["shards"]]
    return manifest


def assert_same_store(out: Path, reference: Path) -> None:
    assert checksums(out) == checksums(reference)
    for shard in sorted(reference.glob("shard-*.safetensors")):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name
    assert comparable(out) == comparable(reference)
    assert (out / "failures.jsonl").read_bytes() == (reference / "failures.jsonl").read_bytes()
    assert FeatureStore(out).verify() == []


def writers(out: Path) -> dict[int, dict]:
    """Shard -> who wrote it (its sidecar's provenance: engine, worker, host, pid)."""
    return {s["shard"]: s["writer"] for s in map(json.loads, (p.read_text() for p in out.glob("shard-*.json")))}


# A Ray run starts 2 actors (a model each): parquet and webdataset are left to `make test-all`.
@pytest.mark.parametrize("form", ["folder", pytest.param("parquet", marks=pytest.mark.slow),
                                  pytest.param("webdataset", marks=pytest.mark.slow)])
def test_same_bytes_as_the_local_runner(cluster, sources, tmp_path, form):
    local = run_extraction(tiny_config(tmp_path, sources[form], out="local", batch_size=4))
    summary = RayEngine(workers=2).run(tiny_config(tmp_path, sources[form], out="ray", batch_size=3))
    assert local.complete and summary.complete
    assert (summary.rows_written, summary.rows_failed) == (local.rows_written, local.rows_failed)
    assert summary.shards_this_run == local.shards_this_run == len(checksums(tmp_path / "local"))
    assert_same_store(tmp_path / "ray", tmp_path / "local")
    assert {w["engine"] for w in writers(tmp_path / "ray").values()} == {"ray"}
    if form == "folder":  # run again: every shard is intact, none is redone
        again = RayEngine(workers=2).run(tiny_config(tmp_path, sources[form], out="ray", batch_size=3))
        assert again.shards_this_run == 0 and again.shards_kept == summary.shards_this_run


def _ray_workers(session: str, title: str = "ray::ShardActor") -> dict[int, str]:
    """pid -> process title of the workers of Ray session `session` whose title starts with `title`
    (Ray titles a worker `ray::IDLE` until it holds an actor, then `ray::ShardActor.__init__`,
    `ray::ShardActor.run` while it runs a shard and `ray::ShardActor` between shards; its parent,
    the session's raylet, names the session: other Ray sessions of the machine are left alone)."""
    found = {}
    for process in psutil.process_iter(["pid", "ppid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if not cmdline.startswith(title):
            continue
        try:
            if any(session in arg for arg in psutil.Process(process.info["ppid"]).cmdline()):
                found[process.info["pid"]] = cmdline
        except psutil.Error:
            continue
    return found


def _committed(out: Path) -> dict[str, int]:
    """Committed shard files -> inode (an atomic rename gives a recomputed shard a new one)."""
    return {p.name: p.stat().st_ino for p in out.glob("shard-*.safetensors") if (out / p.name).with_suffix(".json").exists()}


def test_sigkill_of_a_worker_mid_shard_redoes_only_that_shard(cluster, session, big, tmp_path):
    listing, reference = big
    out = tmp_path / "ray"
    result: dict = {}

    def drive() -> None:
        try:
            result["summary"] = RayEngine(workers=2).run(big_config(tmp_path, listing, "ray"))
        except Exception as err:  # noqa: BLE001 (shown by the assertion below)
            result["error"] = err

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not (out.exists() and _committed(out) and any(t.startswith("ray::ShardActor.run") for t in
                                                          _ray_workers(session).values())):
        assert thread.is_alive() and time.monotonic() < deadline, "no shard was committed in 120 s"
        time.sleep(0.02)
    alive = _ray_workers(session)
    # Every worker process of the session, idle ones too: the second actor may still be starting
    # (`ray::IDLE`) when the first one has committed a shard and is killed in its next.
    before = _ray_workers(session, title="ray::")
    victim = next(pid for pid, title in alive.items() if title.startswith("ray::ShardActor.run"))
    os.kill(victim, signal.SIGKILL)
    kept = _committed(out)
    thread.join(240)
    assert "summary" in result, result
    summary = result["summary"]
    assert 1 <= len(kept) < 4 and summary.complete
    assert summary.shards_this_run + summary.shards_kept == 4
    after = _committed(out)
    assert {name: after[name] for name in kept} == kept  # committed before the kill: never redone
    by = writers(out)
    assert all(f"shard-{k:05d}.safetensors" in kept for k, w in by.items() if w["pid"] == victim)
    # The rest was written by the other actor or by the victim's restarted process (Ray's retry of
    # the shard it was killed in; none when the kill came just after that shard's commit).
    restarted = {w["pid"] for w in by.values()} - set(before) - set(alive)
    assert len(restarted) <= 1, (by, before)
    assert_same_store(out, reference)


def env() -> dict[str, str]:
    """This process's environment, with what `ray.init` set in it (the cluster's token mode)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def cli(out: Path, listing: Path, address: str) -> list[str]:
    return [PYTHON, "-m", "vlm_encoder.cli", "extract", "--model", "preset:vit_tiny_patch16_224", *TINY_ARGS,
            "--dataset", str(listing), "--out", str(out), "--layers", "-2", "-1", "--select", "cls,patch",
            "--shard-size", str(BIG_SHARD), "--batch-size", "32", "--num-workers", "0", "--max-pixels", "20000",
            "--no-progress", "--engine", "ray", "--ray-address", address, "--workers", "2"]


@ray.remote(num_cpus=1)
class Seat:
    """Holds one of the cluster's CPUs: a driver's workers wait for seats (and it for them)."""

    def ready(self) -> bool:
        return True


def test_second_driver_is_refused_and_a_killed_driver_resumes(cluster, big, tmp_path, capsys):
    listing, reference = big
    out = tmp_path / "ray"
    seats = [Seat.remote() for _ in range(2)]  # the first driver plans, then waits for CPUs with the lock held
    ray.get([seat.ready.remote() for seat in seats])
    first = subprocess.Popen(cli(out, listing, cluster), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (out / "plan.json").exists():
            assert first.poll() is None, first.stdout.read().decode()
            assert time.monotonic() < deadline, "the first driver wrote no plan in 120 s"
            time.sleep(0.05)
        capsys.readouterr()
        assert main(cli(out, listing, cluster)[3:]) == 2  # a second driver: this process, the same command
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"in use by extraction pid {first.pid} " in lines[0], lines
        for seat in seats:
            ray.kill(seat)
        while not _committed(out):
            assert first.poll() is None, first.stdout.read().decode()
            assert time.monotonic() < deadline + 60, "the first driver committed no shard"
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        for seat in seats:
            ray.kill(seat)
    kept = _committed(out)
    assert 1 <= len(kept) < 4, kept
    rerun = subprocess.run(cli(out, listing, cluster), env=env(), capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{BIG_ROWS} rows written, 0 failed, of {BIG_ROWS} (complete)" in rerun.stdout
    assert {name: ino for name, ino in _committed(out).items() if name in kept} == kept
    assert_same_store(out, reference)


def test_a_store_into_a_ray_dataset_through_arrow(cluster, big, tmp_path):
    import numpy as np
    import pyarrow as pa

    store = FeatureStore(big[1])
    dataset = ray_dataset(store, layers=[-1], kinds=["cls", "patch"])
    assert dataset.count() == len(store)
    blocks = ray.get(dataset.to_arrow_refs())
    assert all(isinstance(b, pa.Table) for b in blocks)
    assert pa.concat_tables(blocks).column("row_id").to_pylist() == store.row_ids.tolist()
    assert pa.concat_tables(blocks).schema.field("layer2.cls").type.shape == (32,)  # a Ray tensor column
    batch = dataset.take_batch(len(store), batch_format="numpy")  # vectors (n, D), patches (n, N, D)
    np.testing.assert_array_equal(batch["layer2.cls"], store[-1, "cls"][:].numpy())
    np.testing.assert_array_equal(batch["layer2.patch"], store[-1, "patch"][:].numpy())
    store.to_parquet(tmp_path / "feats.parquet", layers=[-1], kinds=["cls"])  # the parquet route
    read = ray.data.read_parquet(str(tmp_path / "feats.parquet")).take_batch(len(store), batch_format="numpy")
    np.testing.assert_array_equal(np.stack(read["layer2.cls"]), store[-1, "cls"][:].numpy())


def test_a_native_resolution_store_into_a_ray_dataset_one_block_per_shard(cluster, tmp_path):
    import numpy as np
    from PIL import Image
    from test_extract_resolution import SHAPES, config

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SHAPES):  # three sizes: ragged patches, shards of 2 and 1 rows
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    cfg = config(tmp_path, folder, resolution="native", max_patches=24)
    assert run_extraction(cfg).complete
    store = FeatureStore(cfg.out)
    dataset = ray_dataset(store, kinds=["patch", "pooled"])
    blocks = ray.get(dataset.to_arrow_refs())
    assert len(blocks) == 2  # one block per shard
    rows = dataset.take_batch(len(store), batch_format="numpy")
    assert rows["row_id"].tolist() == store.row_ids.tolist()
    for row in range(len(store)):
        np.testing.assert_array_equal(rows["layer1.patch"][row], store.get(row)["layer1.patch"].numpy())
    np.testing.assert_array_equal(rows["pooled"], store["pooled"][:].numpy())


def test_engine_options_and_a_missing_ray_are_one_line(tmp_path, images, capsys):
    base = ["extract", "--model", "preset:vit_tiny_patch16_224", *TINY_ARGS, "--dataset", str(images),
            "--out", str(tmp_path / "out")]
    assert main([*base, "--workers", "2"]) == 2
    assert "--workers applies to --engine ray" in capsys.readouterr().err
    assert main([*base, "--ray-address", "auto"]) == 2
    assert "--ray-address applies to --engine ray" in capsys.readouterr().err
    blocked = ("import sys; sys.modules['ray'] = None; from vlm_encoder.cli import main; "
               f"sys.exit(main({[*base, '--engine', 'ray']!r}))")
    run = subprocess.run([PYTHON, "-c", blocked], env=env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "pip install 'vlm-encoder[ray]'" in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()
