"""docker/Dockerfile stays buildable and installs medseg exactly as the README does.

There is no Docker engine on the test machines, so the image is never built here.
Instead the Dockerfile is parsed and checked for what breaks or silently changes an
image:

- every ``COPY``/``ADD`` source exists and is not excluded by ``.dockerignore``, and the
  files ``scripts/setup.sh`` and the build need (pyproject, CMake sources, readme) are in
  the build context, while host build outputs (``.venv``, ``build/``, ``*.so``) are not;
- "the same install as the README" means, concretely: one ``RUN`` executes
  ``scripts/setup.sh`` from the copied repository, no ``RUN`` installs Python packages
  any other way (``pip install``, ``setup.py``, ``uv``, ``conda``), and every
  ``MEDSEG_*`` build knob the Dockerfile sets is a variable that ``setup.sh`` reads (so
  a renamed knob cannot quietly stop working); the README and CI run ``setup.sh`` too;
- the base is a CUDA *devel* image (``nvcc`` for the engine), ``ENTRYPOINT`` is
  ``["medseg"]`` and the venv that setup.sh creates is on ``PATH``;
- hadolint, when installed (Debian does not package it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
SETUP = REPO / "scripts" / "setup.sh"


# --------------------------------------------------------------------------- parsing

@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    value: str  # the rest, continuation lines joined with single spaces
    line: int  # 1-based line where it starts


KEYWORDS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER",
}


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comments dropped, ``\\`` continuations joined.

    As Docker does, comment lines and blank lines inside a continued instruction are
    skipped. Heredocs (``<<EOF``) are not supported (and not used).
    """
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and (not line or line.startswith("#")):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        joined = " ".join(p for p in pending if p)
        pending = []
        keyword, _, value = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
    assert not pending, "Dockerfile ends inside a continued instruction"
    return instructions


def split_flags(value: str) -> tuple[dict[str, str], str]:
    """``--from=x --chown=y rest`` -> ({'from': 'x', 'chown': 'y'}, 'rest')."""
    flags = {}
    while value.startswith("--"):
        token, _, value = value.partition(" ")
        name, _, arg = token[2:].partition("=")
        flags[name] = arg
        value = value.lstrip()
    return flags, value


def exec_form(value: str) -> list[str] | None:
    """The JSON array of an exec-form instruction, or None for shell form."""
    if value.startswith("["):
        parsed = json.loads(value)
        assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed)
        return parsed
    return None


def substitute(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: variables.get(m.group(1), m.group(0)), value)


def declared_args(instructions: list[Instruction]) -> dict[str, str]:
    out = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, _, default = ins.value.partition("=")
            out[name.strip()] = default.strip().strip('"')
    return out


def env_values(instructions: list[Instruction]) -> dict[str, str]:
    """``ENV a=b c=d`` (and the legacy ``ENV a b``) -> {a: b, c: d}."""
    out = {}
    for ins in instructions:
        if ins.keyword != "ENV":
            continue
        if "=" not in ins.value.split()[0]:
            name, _, value = ins.value.partition(" ")
            out[name] = value.strip()
            continue
        for token in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', ins.value):
            out[token[0]] = token[1].strip('"')
    return out


# --------------------------------------------------------------------------- .dockerignore

def _glob_segment(segment: str) -> str:
    out, i = "", 0
    while i < len(segment):
        ch = segment[i]
        if ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "[" and "]" in segment[i + 1 :]:
            close = segment.index("]", i + 1)
            out += "[" + segment[i + 1 : close].replace("!", "^", 1) + "]"
            i = close
        else:
            out += re.escape(ch)
        i += 1
    return out


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``), anchored at the context root."""
    segments = pattern.split("/")
    out = ""
    for i, segment in enumerate(segments):
        if segment == "**":
            out += "(?:[^/]+(?:/|$))*"
        else:
            out += _glob_segment(segment) + ("/" if i < len(segments) - 1 else "")
    return re.compile("^" + out + "$")


def load_dockerignore(root: Path) -> list[tuple[bool, re.Pattern[str]]]:
    path = root / ".dockerignore"
    rules = []
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = line[1:] if negate else line
            pattern = pattern.strip().lstrip("/").rstrip("/")
            rules.append((negate, _pattern_regex(pattern)))
    return rules


def is_ignored(relative: str, rules) -> bool:
    """Docker's rule: a path is excluded when it or a parent folder matches; last match wins."""
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, regex in rules:
        if any(regex.match(p) for p in prefixes):
            ignored = not negate
    return ignored


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def ignore_rules():
    return load_dockerignore(REPO)


def _install_runs(instructions):
    return [ins for ins in instructions if ins.keyword == "RUN" and re.search(r"(^|[\s;&|])(\./)?scripts/setup\.sh\b", ins.value)]


# --------------------------------------------------------------------------- tests

def test_parser_joins_continuations_and_skips_comments():
    text = "# c\nFROM x AS y\nRUN a \\\n  # inside\n\n  && b\nENTRYPOINT [\"medseg\"]\nCOPY --chown=1:1 a b /d/\n"
    parsed = parse_dockerfile(text)
    assert [(i.keyword, i.value, i.line) for i in parsed] == [
        ("FROM", "x AS y", 2), ("RUN", "a && b", 3), ("ENTRYPOINT", '["medseg"]', 7), ("COPY", "--chown=1:1 a b /d/", 8),
    ]
    assert split_flags(parsed[3].value) == ({"chown": "1:1"}, "a b /d/")
    rules = [(False, _pattern_regex(p)) for p in ("build", "**/*.so", "*.egg-info")] + [(True, _pattern_regex("build/keep"))]
    assert is_ignored("build/x/y.o", rules) and not is_ignored("build/keep", rules)
    assert is_ignored("medseg/topology/_engine.cpython-311.so", rules) and is_ignored("medseg.egg-info/PKG-INFO", rules)
    assert not is_ignored("medseg/build.py", rules) and not is_ignored("tests/data/build", rules[1:2])


def test_dockerfile_uses_known_instructions_and_a_cuda_devel_base(instructions):
    assert {i.keyword for i in instructions} <= KEYWORDS
    first = next(i for i in instructions if i.keyword != "ARG")
    assert first.keyword == "FROM"
    image = substitute(first.value.split()[0], declared_args(instructions))
    # nvcc (CUDA devel) must be in the image for CMake to build the engine's CUDA backend.
    assert "cuda" in image.lower() and "devel" in image.lower(), image
    assert "$" not in image, f"FROM {image}: an ARG without a default"


def test_copy_and_add_sources_exist_and_are_in_the_build_context(instructions, ignore_rules):
    copies = [i for i in instructions if i.keyword in ("COPY", "ADD")]
    assert copies, "the Dockerfile copies nothing into the image"
    for ins in copies:
        flags, rest = split_flags(ins.value)
        if "from" in flags:
            continue  # from another stage, not the build context
        parts = exec_form(rest) or rest.split()
        sources, _dest = parts[:-1], parts[-1]
        assert sources, f"line {ins.line}: {ins.keyword} without a source"
        for source in sources:
            assert not re.match(r"^[a-z]+://", source), f"line {ins.line}: ADD from a URL is not reproducible"
            matches = [source] if source in (".", "./") else [str(p.relative_to(REPO)) for p in REPO.glob(source)]
            assert matches and all((REPO / m).exists() for m in matches), f"line {ins.line}: {source} not in the repository"
            if source not in (".", "./"):
                kept = [m for m in matches if not is_ignored(m, ignore_rules)]
                assert kept, f"line {ins.line}: {source} exists but .dockerignore excludes it"


def _repo_copy_destination(instructions) -> str:
    for ins in instructions:
        if ins.keyword == "COPY":
            flags, rest = split_flags(ins.value)
            parts = exec_form(rest) or rest.split()
            if "from" not in flags and parts[:-1] in (["."], ["./"]):
                return parts[-1].rstrip("/") or "/"
    pytest.fail("the Dockerfile never copies the repository (COPY . DEST)")


def test_build_context_holds_what_setup_sh_builds_from(ignore_rules):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = ["pyproject.toml", "CMakeLists.txt", "scripts/setup.sh", "medseg/__init__.py", "medseg/cli.py"]
    readme = pyproject["project"].get("readme")
    if isinstance(readme, str):
        needed.append(readme)  # the build backend refuses to build without it
    cmake = (REPO / "CMakeLists.txt").read_text()
    for rel_dir in re.findall(r"set\(\w+_DIR \$\{CMAKE_CURRENT_SOURCE_DIR\}/(\S+)\)", cmake):
        needed += [str(p.relative_to(REPO)) for p in (REPO / rel_dir).glob("*.[ch]pp")]
    assert any(n.endswith(".cpp") for n in needed), "no engine sources found via CMakeLists.txt"
    problems = [f"{rel}: missing" for rel in needed if not (REPO / rel).is_file()]
    problems += [f"{rel}: excluded by .dockerignore" for rel in needed if is_ignored(rel, ignore_rules)]
    assert not problems, "the image build needs: " + "; ".join(problems)


def test_host_build_outputs_stay_out_of_the_image(ignore_rules):
    # A host .venv or CPU-only engine build copied in would shadow the image's CUDA build.
    for host_only in (".venv/bin/python", "build/cp311/CMakeCache.txt", "medseg/topology/_engine.cpython-311-x86_64-linux-gnu.so", ".git/HEAD"):
        assert is_ignored(host_only, ignore_rules), f"{host_only}: would be copied into the image"


def test_install_is_scripts_setup_sh_as_in_the_readme(instructions):
    runs = _install_runs(instructions)
    assert len(runs) == 1, "exactly one RUN must install medseg with scripts/setup.sh"
    # setup.sh cds to its repository: it must run from the copy of the repository.
    destination = _repo_copy_destination(instructions)
    workdir = None
    for ins in instructions:
        if ins is runs[0]:
            break
        if ins.keyword == "WORKDIR":
            workdir = ins.value.rstrip("/")
    assert workdir == destination, f"setup.sh runs in {workdir}, the repository is copied to {destination}"
    # Anything else that installs Python packages would make the image differ from the tested install.
    other = re.compile(r"\bpip3?\s+install\b|-m\s+pip\b|setup\.py|\buv\s+(pip|sync|add)\b|\bconda\s+install\b|\bpoetry\b")
    for ins in instructions:
        if ins.keyword == "RUN":
            assert not other.search(ins.value), f"line {ins.line}: installs Python packages outside scripts/setup.sh"
    # The README (when written) and CI install with the same script.
    assert "scripts/setup.sh" in (REPO / ".ci" / "run").read_text()
    readme = REPO / "README.md"
    if readme.is_file():
        assert "scripts/setup.sh" in readme.read_text(), "README.md no longer installs with scripts/setup.sh"


def test_medseg_build_knobs_are_read_by_setup_sh_and_cmake(instructions):
    setup_vars = set(re.findall(r"\$\{?(MEDSEG_[A-Z_]+)", SETUP.read_text()))
    assert {"MEDSEG_TORCH_SPEC", "MEDSEG_TORCH_INDEX", "MEDSEG_EXTRAS", "MEDSEG_VENV"} <= setup_vars
    cmake_text = (REPO / "CMakeLists.txt").read_text()
    cmake_options = set(re.findall(r"option\((MEDSEG_[A-Z_]+)", cmake_text))
    cmake_options |= set(re.findall(r"set\((MEDSEG_[A-Z_]+) [^)]*\bCACHE\b", cmake_text))
    set_here = set(declared_args(instructions)) | set(env_values(instructions))
    for run in _install_runs(instructions):
        set_here |= set(re.findall(r"\b(MEDSEG_[A-Z_]+)=", run.value))
        for option in re.findall(r"-D(MEDSEG_[A-Z_]+)=", run.value):
            assert option in cmake_options, f"-D{option}: not an option of CMakeLists.txt ({sorted(cmake_options)})"
    unknown = {v for v in set_here if v.startswith("MEDSEG_")} - setup_vars
    assert not unknown, f"{sorted(unknown)}: set in the Dockerfile but never read by scripts/setup.sh"


def test_cuda_architectures_build_argument_reaches_the_engine(instructions, tmp_path):
    """Configure CMake with the -D arguments the image's install passes (its
    CUDA_ARCHITECTURES default substituted) and read the architectures nvcc would compile
    the engine's CUDA code for. The image once passed CMAKE_CUDA_ARCHITECTURES, which the
    engine's target overrides: every image got sm 80/90 whatever the argument said."""
    for tool in ("cmake", "ninja", "nvcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: CMake cannot configure the CUDA backend here")
    args = declared_args(instructions)
    architectures = args["CUDA_ARCHITECTURES"]
    wanted = sorted({a for a in architectures.split(";")})
    [run] = _install_runs(instructions)
    cmake_args = re.search(r'CMAKE_ARGS="([^"]*)"', run.value).group(1).replace("${CUDA_ARCHITECTURES}", architectures)
    # the local nvcc may be newer than the image's and drop old GPUs (CUDA 13: no sm 70)
    supported = subprocess.run(["nvcc", "--list-gpu-arch"], capture_output=True, text=True).stdout
    usable = [a for a in wanted if f"compute_{a}" in supported]
    if not usable:
        pytest.skip(f"this nvcc compiles none of {architectures}")
    cmake_args = re.sub(r"(-D\w*CUDA_ARCHITECTURES=)\S+", lambda m: m.group(1) + ";".join(usable), cmake_args)
    build = tmp_path / "build"
    done = subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(build), "-G", "Ninja", f"-DPython_EXECUTABLE={sys.executable}",
         *cmake_args.split()],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    if "building the CUDA topology backend" not in done.stdout:
        pytest.skip("CMake found no usable CUDA toolkit here: " + done.stdout.strip().splitlines()[-4])
    compiled = sorted(set(re.findall(r"generate-code=arch=compute_(\d+)", (build / "build.ninja").read_text())))
    assert compiled == sorted(usable), f"CUDA_ARCHITECTURES={architectures} compiled the engine for {compiled}"


def test_entrypoint_is_medseg_from_the_setup_venv(instructions):
    entrypoints = [i for i in instructions if i.keyword == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT"
    assert exec_form(entrypoints[-1].value) == ["medseg"]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "medseg" in pyproject["project"]["scripts"]
    # setup.sh's venv: MEDSEG_VENV if the Dockerfile sets it, else .venv in the repository copy.
    venv = env_values(instructions).get("MEDSEG_VENV") or f"{_repo_copy_destination(instructions)}/.venv"
    path = env_values(instructions).get("PATH", "")
    assert f"{venv}/bin" in path.split(":"), f"PATH={path} lacks {venv}/bin, where setup.sh installs medseg"


def test_docker_readme_shows_build_and_gpu_runs():
    text = (REPO / "docker" / "README.md").read_text()
    assert "docker build -f docker/Dockerfile" in text
    runs = [m.replace("\\\n", " ") for m in re.findall(r"docker run (?:[^\n]*\\\n)*[^\n]*", text)]
    for command in ("train", "predict", "evaluate"):
        examples = [r for r in runs if re.search(rf"\smedseg\s+{command}\s", r)]
        assert examples, f"no `docker run ... medseg {command}` example"
        assert all(" -v " in r and ":/data" in r for r in examples), f"{command}: example without a data mount"
        if command != "evaluate":  # evaluation is CPU-only
            assert all("--gpus all" in r and "--shm-size=8g" in r for r in examples), f"{command}: needs --gpus all --shm-size=8g"


def test_hadolint_finds_no_warnings():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (Debian does not package it); the parse checks above still ran")
    result = subprocess.run([hadolint, "--failure-threshold", "warning", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
