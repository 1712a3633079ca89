#!/usr/bin/env python3
"""The GPU check behind scripts/gpu-check.sh: multiclip's `extract` against PyTorch + transformers
on the same machine, the same random-weight checkpoints and the same files.

`main` runs every step as a child process (so each is measured alone, and a step that overruns its
share of the time budget is cut and reported, never blocking the rest):
  1. models     seeded random CLIP ViT-L/14 and BLIP-ITM-large checkpoints in the Hub layout
                (scripts/make-clip-blip-fixtures.py's configs, weights and file layout; tokenizers
                from tests/fixtures/*-tiny, which carry the real vocabularies); tiny configs in
                cpu-tiny mode;
  2. parity     `multiclip extract` of the first PARITY rows of data/demo in f32 (stored f32) and in
                bf16, against transformers in f32 (eager attention, TF32 off): every output
                within 1e-4 max abs (f32), every row's cosine >= 0.999 (bf16);
  3. throughput end to end (decode + preprocess + forward + output write) over ROWS rows (data/demo
                repeated), both models, two batch sizes: multiclip (bf16, f16 stored) then the
                PyTorch peer (bf16, SDPA attention, a DataLoader with WORKERS workers), one after
                the other; peak GPU memory of each process (NVML or nvidia-smi, polled), the
                peer's torch.cuda.max_memory_allocated, peak host RSS;
  4. memory     multiclip at the larger batch over SMALL rows too: peak GPU memory is bounded by
                the batch, not the dataset.
Writes OUT/gpu-check.json and OUT/gpu-check.md (and OUT/gpu-check-logs.tar.xz).

Usage (gpu-check.sh sets the environment; run it, not this):
  gpu-check.py main MODE BIN WORK OUT        MODE: gpu | cpu-tiny
  gpu-check.py models SIZE DIR               SIZE: full | tiny
  gpu-check.py reference KIND MODEL DATA DEVICE OUT.safetensors
  gpu-check.py peer KIND MODEL DATA BATCH WORKERS DEVICE OUT_DIR
"""

import csv
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"

# What this check passes to `multiclip` (main's CLI after issue 10: `--part`, spec options after
# a colon). `--precision` is detected from `extract --help` and left out (its runs skipped) while
# the binary lacks it.
DEVICE_FLAG = "--device"
PRECISION_FLAG = "--precision"
PART_FLAG = "--part"
CLIP_ALL_OUTPUTS = ":image_tokens=true"

MODES = {
    "gpu": dict(size="full", device="cuda", parity=64, rows=2048, small=512, batches=(64, 256), workers=16,
                budget=465),
    "cpu-tiny": dict(size="tiny", device="cpu", parity=8, rows=64, small=16, batches=(8, 32), workers=2,
                     budget=1800),
}
# Model folder names under WORK/models, per size.
MODELS = {"full": {"clip": "clip-l14", "blip": "blip-large"}, "tiny": {"clip": "clip-tiny", "blip": "blip-tiny"}}
# Seconds each step may take at most (also cut to what is left of the budget).
LIMITS = {"models": 150, "records": 20, "reference": 90, "multiclip": 60, "peer": 75}
F32_MAX_ABS = 1e-4
BF16_MIN_COSINE = 0.999


def fixtures():
    """scripts/make-clip-blip-fixtures.py as a module (configs, weights, processors, outputs)."""
    spec = importlib.util.spec_from_file_location("fixtures", ROOT / "scripts" / "make-clip-blip-fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ children (import torch)
def make_models(size: str, out: Path) -> None:
    from transformers import AutoTokenizer

    fx = fixtures()
    out.mkdir(parents=True, exist_ok=True)
    for kind, name in MODELS[size].items():
        target = out / name
        if (target / "model.safetensors").exists():
            continue
        start = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(ROOT / "tests" / "fixtures" / f"{kind}-tiny")
        if kind == "clip":
            config = fx.clip_tiny_config() if size == "tiny" else fx.clip_full_config(name)
            fx.random_clip(target, config, tok, half=False, seed=fx.SEED)
        else:
            config = fx.blip_tiny_config() if size == "tiny" else fx.blip_full_config(name)
            fx.random_blip(target, config, tok, half=False, seed=fx.SEED)
        print(f"{target}: {time.perf_counter() - start:.1f} s", flush=True)


def load_model(kind: str, model_dir: Path, dtype, attention: str):
    from transformers import BlipForImageTextRetrieval, CLIPModel

    cls = CLIPModel if kind == "clip" else BlipForImageTextRetrieval
    try:
        model = cls.from_pretrained(model_dir, dtype=dtype, attn_implementation=attention)
    except ValueError as e:  # the model has no such attention implementation
        print(f"{kind}: {attention} attention unavailable ({e}); eager", flush=True)
        model = cls.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    return model.eval()


def kind_api(kind: str, model_dir: Path):
    """(image processor, text inputs fn, outputs fn) of transformers for `kind`."""
    from transformers import AutoTokenizer

    fx = fixtures()
    tok = AutoTokenizer.from_pretrained(model_dir)
    size = json.loads((model_dir / "config.json").read_text())["vision_config"]["image_size"]
    if kind == "clip":
        return fx.clip_processor(size), lambda c: fx.clip_text_inputs(tok, c), fx.clip_outputs
    return fx.blip_processor(size), lambda c: fx.blip_text_inputs(tok, c), fx.blip_outputs


def read_rows(data: Path):
    with open(data / "train.csv", newline="") as f:
        return [(r["ImageID"], r["Caption"]) for r in csv.DictReader(f)]


def reference(kind: str, model_dir: Path, data: Path, device: str, out: Path) -> None:
    """transformers in f32 with TF32 off: every output of multiclip's backbone, in row order."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    model = load_model(kind, model_dir, torch.float32, "eager").to(device)
    processor, text_inputs, outputs_of = kind_api(kind, model_dir)
    rows = read_rows(data)
    pixels = processor([Image.open(data / "data" / i) for i, _ in rows], return_tensors="pt")["pixel_values"]
    ids, mask = text_inputs([c for _, c in rows])
    parts = []
    with torch.inference_mode():
        for s in range(0, len(rows), 16):
            on = [t[s:s + 16].to(device) for t in (pixels, ids, mask)]
            parts.append({k: v.float().cpu() for k, v in outputs_of(model, *on).items()})
    result = {k: torch.cat([p[k] for p in parts]).contiguous() for k in parts[0]}
    save_file({"pixel_values": pixels, **result}, out)
    print(f"{out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in result.items()), flush=True)


def peer(kind: str, model_dir: Path, data: Path, batch: int, workers: int, device: str, out: Path) -> None:
    """What a user would run instead of multiclip: a DataLoader decoding and preprocessing in
    `workers` processes, the model in bf16 with SDPA attention (eager where transformers has none
    for the model, as for BLIP; the report names it), f16 outputs saved at the end.
    Timed from the loader's start to the saved file, with the model already on the device (as
    multiclip's rows/s, which does not count loading the model)."""
    import torch
    from PIL import Image

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    model = load_model(kind, model_dir, torch.bfloat16, "sdpa").to(device)
    processor, text_inputs, outputs_of = kind_api(kind, model_dir)
    rows = read_rows(data)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            image = Image.open(data / "data" / rows[i][0])
            return processor(image, return_tensors="pt")["pixel_values"][0], rows[i][1]

    def collate(items):
        return (torch.stack([p for p, _ in items]), *text_inputs([c for _, c in items]))

    loader = torch.utils.data.DataLoader(
        Rows(), batch_size=batch, num_workers=workers, collate_fn=collate, pin_memory=device == "cuda"
    )
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    stored = []
    with torch.inference_mode():
        for pixels, ids, mask in loader:
            pixels = pixels.to(device, non_blocking=True).to(torch.bfloat16)
            result = outputs_of(model, pixels, ids.to(device, non_blocking=True), mask.to(device, non_blocking=True))
            stored.append({k: v.to(torch.float16).cpu().numpy() for k, v in result.items()})
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "outputs.npz", **{k: np.concatenate([s[k] for s in stored]) for k in stored[0]})
    seconds = time.perf_counter() - start
    report = {
        "rows": len(rows),
        "seconds": seconds,
        "items_per_s": len(rows) / seconds,
        "attention": model.config._attn_implementation,
        "torch_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    }
    (out / "peer.json").write_text(json.dumps(report) + "\n")
    print(json.dumps(report), flush=True)


# ------------------------------------------------------------------ measuring child processes
class GpuMemory:
    """Device memory in use (MiB) and per process, through NVML, else nvidia-smi, else nothing."""

    def __init__(self):
        self.nvml = None
        self.smi = shutil.which("nvidia-smi")
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            pass

    @property
    def available(self):
        return self.nvml is not None or self.smi is not None

    def sample(self):
        """(device MiB used, {pid: MiB}) or None."""
        try:
            if self.nvml:
                used = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20
                procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
                return used, {p.pid: (p.usedGpuMemory or 0) / 2**20 for p in procs}
            if self.smi:
                q = lambda a: subprocess.run([self.smi, a, "--format=csv,noheader,nounits"], capture_output=True,
                                             text=True, timeout=5).stdout
                used = float(q("--query-gpu=memory.used").split()[0])
                procs = {}
                for line in q("--query-compute-apps=pid,used_memory").splitlines():
                    pid, mib = (x.strip() for x in line.split(","))
                    procs[int(pid)] = float(mib)
                return used, procs
        except Exception:
            return None
        return None

    def describe(self):
        if self.nvml:
            name = self.nvml.nvmlDeviceGetName(self.handle)
            return {"gpu": name.decode() if isinstance(name, bytes) else name,
                    "driver": str(self.nvml.nvmlSystemGetDriverVersion())}
        if self.smi:
            out = subprocess.run([self.smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True).stdout.strip()
            return {"gpu": out}
        return {"gpu": None}


def peak_rss_kib(pid: int) -> int:
    """VmHWM of a running process (its own peak RSS since exec; ru_maxrss of a child would
    include the forking parent's)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def measure(cmd, limit: float, log: Path, gpu: GpuMemory, env=None) -> dict:
    """Runs `cmd` (output to `log`) for at most `limit` s, polling GPU memory; its wall time,
    exit status, peak host RSS and peak GPU memory (device total minus the level before it
    started, and the process's own figure where the driver reports one)."""
    base = gpu.sample()
    peak_dev, peak_proc, rss = 0.0, 0.0, 0
    start = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        proc = subprocess.Popen(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        cut = False
        while True:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > limit:
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status = os.waitpid(proc.pid, 0)
                cut = True
                break
            rss = max(rss, peak_rss_kib(proc.pid))
            s = gpu.sample() if base else None
            if s:
                peak_dev = max(peak_dev, s[0] - base[0])
                peak_proc = max(peak_proc, s[1].get(proc.pid, 0.0))
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
    try:  # reap anything left in its process group (DataLoader workers)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    text = log.read_text(errors="replace")
    return {
        "status": "cut" if cut else ("ok" if proc.returncode == 0 else "failed"),
        "exit": proc.returncode,
        "wall_s": round(time.monotonic() - start, 2),
        "limit_s": round(limit, 1),
        "host_rss_peak_mib": round(rss / 1024),
        "gpu_mem_peak_mib": round(peak_dev) if base else None,
        "gpu_mem_peak_process_mib": round(peak_proc) if peak_proc else None,
        "log": log.name,
        "tail": "" if proc.returncode == 0 and not cut else text[-1500:],
    }


# ------------------------------------------------------------------ datasets and caches
def write_dataset(out: Path, records, rows: int) -> Path:
    """A competition-format folder of `rows` rows: the demo records repeated; repeat k's images
    are reached through data/rk -> data/demo/data, so every id is unique."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    with open(out / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageID", "Labels", "Caption"])
        for i in range(rows):
            rep, r = divmod(i, len(records))
            link = out / "data" / f"r{rep}"
            if link.is_symlink() and link.resolve() != (DEMO / "data").resolve():
                link.unlink()  # left by a run from another checkout
            if not link.is_symlink():
                link.symlink_to(DEMO / "data", target_is_directory=True)
            rec = records[r]
            w.writerow([f"r{rep}/{rec['id']}", " ".join(rec["labels"]), rec["caption"]])
    return out


def read_cache(cache: Path):
    """Every stored output of a complete cache (shards concatenated) and the stored row ids."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    shards = sorted(cache.glob("shard-*.safetensors"))
    parts = [load_file(s) for s in shards]
    ids = []
    for shard in shards:
        with safe_open(shard, "numpy") as f:
            ids += json.loads(f.metadata()["multiclip"])["ids"]
    return {k: np.concatenate([p[k] for p in parts]).astype(np.float32) for k in parts[0]}, ids


def compare(reference: dict, ours: dict, precision: str) -> list:
    """Each stored output against the reference: max abs difference and the lowest row cosine."""
    rows = []
    for name, got in ours.items():
        want = reference.get(name)
        if want is None or want.size != got.size:
            rows.append({"output": name, "pass": False, "limit": "not in the reference, or another shape"})
            continue
        got = got.reshape(want.shape)
        a, b = got.reshape(len(got), -1).astype(np.float64), want.reshape(len(want), -1).astype(np.float64)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        max_abs = float(np.abs(a - b).max())
        exact = name.endswith("_mask")
        ok = max_abs == 0 if exact else (max_abs <= F32_MAX_ABS if precision == "f32" else cos.min() >= BF16_MIN_COSINE)
        rows.append({"output": name, "shape": list(want.shape), "max_abs": max_abs, "min_cosine": float(cos.min()),
                     "limit": "exact" if exact else (f"max abs <= {F32_MAX_ABS:g}" if precision == "f32"
                                                     else f"cosine >= {BF16_MIN_COSINE}"),
                     "pass": bool(ok)})
    return rows


# ------------------------------------------------------------------ the whole check
class Check:
    def __init__(self, mode: str, binary: Path, work: Path, out: Path):
        self.cfg, self.mode = dict(MODES[mode]), mode
        self.binary, self.work, self.out = binary, work, out
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.cfg["budget"] = float(os.environ.get("GPU_CHECK_BUDGET", self.cfg["budget"]))
        self.deadline = time.monotonic() + self.cfg["budget"]
        self.gpu = GpuMemory()
        self.bin_env = dict(os.environ, LD_LIBRARY_PATH=os.environ.get("GPU_CHECK_LD_LIBRARY_PATH", ""))
        self.result = {"mode": mode, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "config": {k: v for k, v in self.cfg.items()}, "steps": [], "parity": [],
                       "throughput": [], "memory": []}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def step(self, name: str, cmd, limit: float, binary=False) -> dict:
        """Runs one measured step within `limit` and what is left of the budget; records it."""
        allowed = min(limit, self.left())
        if allowed < 3:
            r = {"status": "skipped", "why": "out of time"}
        else:
            r = measure(cmd, allowed, self.logs / f"{name}.log", self.gpu, self.bin_env if binary else None)
        r["step"] = name
        self.result["steps"].append(r)
        print(f"[{self.cfg['budget'] - self.left():6.1f} s] {name}: {r['status']}"
              + (f" in {r['wall_s']} s" if "wall_s" in r else "") + (f"\n{r['tail']}" if r.get("tail") else ""),
              flush=True)
        return r

    def py(self, *args):
        return [sys.executable, str(Path(__file__).resolve()), *map(str, args)]

    def extract(self, name, kind, data, batch, precision, dtype, options=""):
        """`multiclip extract` of `data` into WORK/caches/name; its result with multiclip's rows/s."""
        cache = self.work / "caches" / name
        shutil.rmtree(cache, ignore_errors=True)
        cmd = [self.binary, "extract", "--data", data, PART_FLAG, "train", "--backbone",
               f"{kind}:{self.models / MODELS[self.cfg['size']][kind]}{options}", "--out", cache,
               "--batch-size", batch, "--dtype", dtype, DEVICE_FLAG, self.cfg["device"]]
        if precision and self.has_precision:
            cmd += [PRECISION_FLAG, precision]
        r = self.step(name, cmd, LIMITS["multiclip"], binary=True)
        if r["status"] == "ok":
            log = (self.logs / f"{name}.log").read_text()
            m = re.search(r"computed now in ([0-9.]+) s \(([0-9.]+) rows/s\)", log)
            t = re.search(r"time +([0-9.]+) s in the model, ([0-9.]+) s waiting", log)
            if m:
                r.update(seconds=float(m[1]), items_per_s=float(m[2]))
            if t:
                r.update(forward_s=float(t[1]), input_wait_s=float(t[2]))
        return r, cache

    def run(self) -> None:
        cfg = self.cfg
        self.models = self.work / "models"
        help_text = subprocess.run([self.binary, "extract", "--help"], capture_output=True, text=True,
                                   env=self.bin_env).stdout
        self.has_precision = PRECISION_FLAG in help_text
        version = subprocess.run([self.binary, "--version"], capture_output=True, text=True, env=self.bin_env)
        if version.returncode != 0:
            self.result["machine"] = {"binary": f"{self.binary} does not start: {version.stderr[-500:]}"}
            raise SystemExit(self.result["machine"]["binary"])
        self.result["machine"] = {
            "cores": os.cpu_count(), "binary": version.stdout.strip(), "binary_has_precision": self.has_precision,
            "python": sys.version.split()[0], **self.gpu.describe(), **self.versions()}

        self.step("models", self.py("models", cfg["size"], self.models), LIMITS["models"])
        records_log = self.logs / "records.jsonl"
        with open(records_log, "w") as f:
            subprocess.run([self.binary, "dataset", "records", DEMO, PART_FLAG, "train"], stdout=f, check=True,
                           env=self.bin_env)
        records = [json.loads(line) for line in records_log.read_text().splitlines()]
        parity_data = write_dataset(self.work / f"data-{cfg['parity']}", records, cfg["parity"])

        for kind in ("clip", "blip"):
            model = self.models / MODELS[cfg["size"]][kind]
            ref = self.work / f"reference-{kind}.safetensors"
            r = self.step(f"reference-{kind}", self.py("reference", kind, model, parity_data, cfg["device"], ref),
                          LIMITS["reference"])
            for precision, dtype in (("f32", "f32"), ("bf16", "f32")):
                name = f"parity-{kind}-{precision}"
                if precision != "f32" and not self.has_precision:
                    self.result["steps"].append({"step": name, "status": "skipped",
                                                 "why": f"the binary has no {PRECISION_FLAG}"})
                    continue
                # Every output the backbone has, CLIP's optional image tokens too.
                options = CLIP_ALL_OUTPUTS if kind == "clip" else ""
                e, cache = self.extract(name, kind, parity_data, cfg["batches"][0], precision, dtype, options)
                entry = {"model": MODELS[cfg["size"]][kind], "precision": precision, "rows": cfg["parity"]}
                if r["status"] == "ok" and e["status"] == "ok":
                    from safetensors.numpy import load_file

                    outputs, ids = read_cache(cache)
                    entry["outputs"] = compare(load_file(ref), outputs, precision)
                    if ids != [i for i, _ in read_rows(parity_data)]:
                        entry["outputs"].append({"output": "row ids", "pass": False, "limit": "the csv's order"})
                    entry["pass"] = all(o["pass"] for o in entry["outputs"])
                else:
                    entry["pass"] = False
                    entry["why"] = "reference failed" if r["status"] != "ok" else f"multiclip {e['status']}"
                self.result["parity"].append(entry)

        big = write_dataset(self.work / f"data-{cfg['rows']}", records, cfg["rows"])
        for kind in ("clip", "blip"):
            model = self.models / MODELS[cfg["size"]][kind]
            for batch in cfg["batches"]:
                e, cache = self.extract(f"e2e-{kind}-b{batch}", kind, big, batch, "bf16", "f16")
                shutil.rmtree(cache, ignore_errors=True)
                out = self.work / "peer" / f"{kind}-b{batch}"
                p = self.step(f"peer-{kind}-b{batch}",
                              self.py("peer", kind, model, big, batch, cfg["workers"], cfg["device"], out),
                              LIMITS["peer"])
                if p["status"] == "ok":
                    p.update(json.loads((out / "peer.json").read_text()))
                shutil.rmtree(out, ignore_errors=True)
                for tool, r in (("multiclip", e), ("pytorch", p)):
                    self.result["throughput"].append({"model": MODELS[cfg["size"]][kind], "batch": batch,
                                                      "rows": cfg["rows"], "tool": tool, **self.figures(r)})
        small = write_dataset(self.work / f"data-{cfg['small']}", records, cfg["small"])
        batch = cfg["batches"][-1]
        for kind in ("clip", "blip"):
            e, cache = self.extract(f"memory-{kind}-b{batch}", kind, small, batch, "bf16", "f16")
            shutil.rmtree(cache, ignore_errors=True)
            large = next((t for t in self.result["throughput"] if t["tool"] == "multiclip"
                          and t["model"] == MODELS[cfg["size"]][kind] and t["batch"] == batch), {})
            self.result["memory"].append({"model": MODELS[cfg["size"]][kind], "batch": batch,
                                          "rows": [cfg["small"], cfg["rows"]],
                                          "gpu_mem_peak_mib": [e.get("gpu_mem_peak_mib"), large.get("gpu_mem_peak_mib")],
                                          "host_rss_peak_mib": [e.get("host_rss_peak_mib"), large.get("host_rss_peak_mib")],
                                          "status": [e["status"], large.get("status")]})

    @staticmethod
    def figures(r: dict) -> dict:
        keys = ("status", "items_per_s", "seconds", "wall_s", "forward_s", "input_wait_s", "gpu_mem_peak_mib",
                "gpu_mem_peak_process_mib", "torch_max_allocated_mib", "host_rss_peak_mib", "attention")
        return {k: r[k] for k in keys if k in r}

    @staticmethod
    def versions() -> dict:
        from importlib.metadata import PackageNotFoundError, version

        out = {}
        for name in ("torch", "transformers", "pillow", "numpy"):
            try:
                out[name] = version(name)
            except PackageNotFoundError:
                out[name] = None
        return out

    def write(self) -> None:
        self.result["seconds"] = round(self.cfg["budget"] - self.left(), 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu-check.json").write_text(json.dumps(self.result, indent=1) + "\n")
        (self.out / "gpu-check.md").write_text(markdown(self.result))
        with tarfile.open(self.out / "gpu-check-logs.tar.xz", "w:xz") as tar:
            tar.add(self.logs, arcname="logs")


def fmt(x, digits=1):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def sci(x):
    return "-" if x is None else f"{x:.2e}"


def markdown(res: dict) -> str:
    m = res.get("machine", {})
    lines = [f"gpu-check ({res['mode']}), {res['started']}: {m.get('gpu') or 'no GPU'}"
             + (f", driver {m['driver']}" if m.get("driver") else "")
             + f", {m.get('cores')} cores; {m.get('binary')}; torch {m.get('torch')}, transformers "
             f"{m.get('transformers')}, Pillow {m.get('pillow')}; {res['seconds']} s in all", ""]
    lines += ["| parity | precision | rows | output | max abs | min cosine | limit | pass |", "|---|---|---|---|---|---|---|---|"]
    for p in res["parity"]:
        for o in p.get("outputs", [{"output": p.get("why", "-"), "pass": False}]):
            lines.append(f"| {p['model']} | {p['precision']} | {p['rows']} | {o['output']} | "
                         f"{sci(o.get('max_abs'))} | "
                         f"{fmt(o.get('min_cosine'), 6)} | {o.get('limit', '-')} | {'yes' if o['pass'] else 'NO'} |")
    lines += ["", "| end to end | batch | rows | multiclip items/s | PyTorch items/s (attention) | ratio | multiclip GPU peak MiB | "
              "PyTorch GPU peak MiB (max allocated) | multiclip s in model / waiting for input | wall s multiclip / PyTorch | "
              "status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    pairs = {}
    for t in res["throughput"]:
        pairs.setdefault((t["model"], t["batch"], t["rows"]), {})[t["tool"]] = t
    for (model, batch, rows), pair in pairs.items():
        a, b = pair.get("multiclip", {}), pair.get("pytorch", {})
        ratio = a["items_per_s"] / b["items_per_s"] if a.get("items_per_s") and b.get("items_per_s") else None
        attention = f" ({b['attention']})" if b.get("attention") else ""
        lines.append(f"| {model} | {batch} | {rows} | {fmt(a.get('items_per_s'))} | {fmt(b.get('items_per_s'))}{attention} | "
                     f"{fmt(ratio, 2)} | {fmt(a.get('gpu_mem_peak_mib'))} | {fmt(b.get('gpu_mem_peak_mib'))} "
                     f"({fmt(b.get('torch_max_allocated_mib'), 0)}) | {fmt(a.get('forward_s'))} / "
                     f"{fmt(a.get('input_wait_s'))} | {fmt(a.get('wall_s'))} / {fmt(b.get('wall_s'))} | "
                     f"{a.get('status', '-')} / {b.get('status', '-')} |")
    lines += ["", "| multiclip GPU memory | batch | rows | GPU peak MiB | host peak RSS MiB | status |", "|---|---|---|---|---|---|"]
    for mem in res["memory"]:
        for i in range(2):
            lines.append(f"| {mem['model']} | {mem['batch']} | {mem['rows'][i]} | {fmt(mem['gpu_mem_peak_mib'][i])} | "
                         f"{fmt(mem['host_rss_peak_mib'][i])} | {mem['status'][i] or '-'} |")
    bad = [s for s in res["steps"] if s["status"] != "ok"]
    if bad:
        lines += ["", "Steps not ok: " + "; ".join(f"{s['step']} {s['status']}"
                                                    + (f" ({s['why']})" if s.get("why") else "") for s in bad)]
    return "\n".join(lines) + "\n"


def main(argv) -> None:
    if not argv:
        raise SystemExit(__doc__)
    cmd, args = argv[0], argv[1:]
    if cmd == "main" and len(args) == 4:
        check = Check(args[0], Path(args[1]), Path(args[2]), Path(args[3]))
        try:
            check.run()
        finally:
            check.write()
        print((check.out / "gpu-check.md").read_text())
    elif cmd == "models" and len(args) == 2:
        make_models(args[0], Path(args[1]))
    elif cmd == "reference" and len(args) == 5:
        reference(args[0], Path(args[1]), Path(args[2]), args[3], Path(args[4]))
    elif cmd == "peer" and len(args) == 7:
        peer(args[0], Path(args[1]), Path(args[2]), int(args[3]), int(args[4]), args[5], Path(args[6]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
