# dgss-lessons: one command to set up and run, one to set up and test.
#   make lab        set up .venv, then JupyterLab on notebooks/          (the main job)
#   make lessons    set up, then execute every lesson headless into build/notebooks/
#   make test       set up, then run every test (unit tests + nbval over all notebooks)
#   make notebooks  re-execute every notebook in place: the canonical way to refresh outputs
#   make students   regenerate the student copies (notebooks/students/) from the solutions
#   make diagrams   redraw the lessons' architecture diagrams (notebooks/assets/diagrams/*.svg)
#   make bench      benchmarks: ToyWorld rendering, the selective scan against mambapy
#   make site       the course website into build/site/ (committed outputs, offline; site/)
#   make site-check build it, then load every page in headless Chromium (build/site-shots/)
#   make gpu-carry  download what a bare GPU machine lacks into .whl/ (mamba-ssm sdist, wheels)
#   make gpu-check  on a GPU machine: every owed GPU figure (reprod.gpu_check, about 9 minutes)
# Needs only Python >= 3.10 with venv. TORCH pins the PyTorch wheels (PyPI; no other index).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dgss-installed

# JupyterLab refuses to start as root unless told to; Docker and other containers run as root.
LAB_FLAGS := $(if $(filter 0,$(shell id -u 2>/dev/null)),--allow-root,)

.PHONY: setup lab lessons test test-fast notebooks students diagrams bench check-env lint hooks clean \
	gpu-carry gpu-check site site-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $(STAMP)

setup: $(STAMP)

lab: setup
	$(VENV)/bin/jupyter lab $(LAB_FLAGS) notebooks/

lessons: setup
	$(PY) -m reprod.course.notebooks --execute-to build/notebooks

test: setup
	$(PY) -m pytest -n 2 --dist loadscope

test-fast: setup
	$(PY) -m pytest tests -n 2

notebooks: setup
	$(PY) -m reprod.course.notebooks --in-place

students: setup
	$(PY) -m reprod.course.student_copies

diagrams: setup
	$(PY) -m reprod.course.diagrams

bench: setup
	$(PY) -m reprod.toy.bench_render
	$(PY) -m reprod.course.bench_scan

# The course website (reprod.course.site, config in site/); installs the site extra if missing.
SITE_DEPS := $(PY) -c "from reprod.course.site import missing_packages as m; \
	raise SystemExit(bool(m() or m({'playwright': 'playwright'})))" 2>/dev/null || \
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[site]"

site: setup
	$(SITE_DEPS)
	$(PY) -m reprod.course.site

site-check: setup
	$(SITE_DEPS)
	$(PY) -m reprod.course.site --check

# A bare GPU machine (CUDA, nvcc, PyTorch; Python 3.12; no network) lacks these: carry .whl/.
GPU_WHEELS ?= open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 diffusers==0.42.1 mambapy==1.2.0
gpu-carry: setup
	mkdir -p .whl
	MAMBA_SKIP_CUDA_BUILD=TRUE $(PY) -m pip download --quiet --no-deps --no-binary :all: \
		--no-build-isolation -d .whl mamba_ssm==2.3.2.post1
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

gpu-check:
	python3 -m reprod.gpu_check --wheels .whl --sdist $$(ls .whl/mamba_ssm-*.tar.gz)

check-env: setup
	$(PY) -m lessons.check_env

lint: setup
	$(VENV)/bin/ruff check .

hooks: setup
	$(VENV)/bin/nbstripout --install --keep-output --keep-count

clean:
	rm -rf $(VENV) build dist *.egg-info
