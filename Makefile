# predictord: `make run` serves predictors/ on 127.0.0.1:8080; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Installed layout (FHS): the package in a venv under /opt, config in /etc, predictors and state in /var/lib.
PREFIX ?= /opt/predictord
SYSCONFDIR ?= /etc/predictord
STATEDIR ?= /var/lib/predictord
UNITDIR ?= /etc/systemd/system
DESTDIR ?=
SERVICE_USER ?= predictord
# The service user must be able to run it: the system's Python, not one under a home directory (pyenv).
INSTALL_PYTHON ?= /usr/bin/python3

.PHONY: run test unit integration stress lint clean bench soak faults hostile browser-deps balancer-deps balancer-test ray-test gpu-check install install-venv install-files install-user uninstall

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/predictord --config config.toml

test: lint
	$(BIN)/python -m pytest -q tests/unit tests/integration

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

# The hostile cases at full scale (500 APIs, 16 torch probes at once, 100 deletes): about 5 minutes; .ci/run runs it.
stress: $(STAMP)
	$(BIN)/python -m pytest -q tests/stress

# The status page test drives Debian's chromium with playwright-core (pinned in tests/browser/package.json, installed
# into .browser/ so that tests/ holds only our code); without them it is skipped.
browser-deps:
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
	mkdir -p .browser && cp tests/browser/package.json .browser/
	cd .browser && npm install --no-audit --no-fund --silent

# Every GPU path on a real NVIDIA GPU, in one go (at most 8 minutes; the report goes to docs/gpu-check.md, the
# NVML trace to tests/unit/traces/nvml_foreign.jsonl). Without a GPU it says so and exits 2. It needs no venv: on a
# GPU machine with no network, the system's Python and the wheels of ../shared/tools/gpu-wheels (README, "GPUs").
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py

# `predictord ray` on a real two-node Ray cluster on loopback (tests/ray): its own venv with the ray extra, so that
# the daemon's venv never holds ray (about 5 minutes; .ci/run runs it).
RAY_VENV := .venv-ray
$(RAY_VENV)/.installed: setup.py
	$(PYTHON) -m venv $(RAY_VENV)
	$(RAY_VENV)/bin/pip install -q --upgrade pip
	$(RAY_VENV)/bin/pip install -q torch==2.13.0
	$(RAY_VENV)/bin/pip install -q -e '.[test,ray]'
	touch $@

ray-test: $(RAY_VENV)/.installed
	$(RAY_VENV)/bin/python -m pytest -q -s -W ignore::DeprecationWarning tests/ray

# Two daemons behind Debian's haproxy (tests/balancer, about 1.5 minutes; .ci/run runs it): its own target, since it
# needs haproxy (balancer-deps installs it; without it the suite is skipped).
balancer-deps:
	command -v haproxy >/dev/null || { apt-get update -qq && apt-get install -y -qq haproxy; }

balancer-test: $(STAMP)
	$(BIN)/python -m pytest -q tests/balancer

lint: $(STAMP)
	$(BIN)/ruff check daemon tests bench
	$(BIN)/mypy daemon/predictord

clean:
	rm -rf $(VENV) $(RAY_VENV) build *.egg-info daemon/*.egg-info

# The benchmark suite (under 10 minutes on 2 cores); it needs Debian's wrk and builds LitServe's venv once.
bench: $(STAMP)
	@command -v wrk >/dev/null || { echo "bench needs wrk: sudo apt-get install wrk"; exit 1; }
	$(BIN)/pip install -q psutil httpx uv==0.13.9
	$(BIN)/python bench/run.py --seconds 5 --reps 1
	$(BIN)/python bench/reload.py --reloads 20
	$(BIN)/python bench/deps.py --reps 3

# The 10-minute soak (mixed load, a reload every 30 s; `make test` runs it for 60 s) and the fault figures, both
# printed for RELIABILITY.md.
soak: $(STAMP)
	PREDICTORD_SOAK_SECONDS=600 $(BIN)/python -m pytest -q -s tests/integration/test_soak.py

faults: $(STAMP)
	$(BIN)/python bench/faults.py --kills 10

# What hostile directories and predictors cost the neighbours (RELIABILITY.md).
hostile: $(STAMP)
	$(BIN)/python bench/hostile.py

# `sudo make install`: the package, the predictord user, config, predictors directory and units.
# `make install-files DESTDIR=/tmp/stage` stages the files alone (no venv, no user) to look at them.
install: install-venv install-files install-user
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo
	@echo "predictord is installed. Next:"
	@echo "  sudo systemctl enable --now predictord"
	@echo "  curl -X POST localhost:8080/hello -H 'Content-Type: application/json' -d '{\"name\": \"Ada\"}'"
	@echo "Predictors go in $(STATEDIR)/predictors (owned by root, e.g. sudo install -m 644 NAME.py $(STATEDIR)/predictors/)."

install-venv:
	@[ -n "$(DESTDIR)" ] || [ "$$(id -u)" = 0 ] || { echo "make install needs root: sudo make install"; exit 1; }
	$(INSTALL_PYTHON) -m venv $(DESTDIR)$(PREFIX)/venv
	$(DESTDIR)$(PREFIX)/venv/bin/pip install -q --upgrade pip
	$(DESTDIR)$(PREFIX)/venv/bin/pip install -q torch==2.13.0
	$(DESTDIR)$(PREFIX)/venv/bin/pip install -q .

install-files:
	install -d -m 0755 $(DESTDIR)$(SYSCONFDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(STATEDIR)
	install -m 0644 systemd/predictord.service systemd/predictord.socket $(DESTDIR)$(UNITDIR)/
	[ -e $(DESTDIR)$(SYSCONFDIR)/config.toml ] || install -m 0644 systemd/config.toml $(DESTDIR)$(SYSCONFDIR)/config.toml
	@if [ ! -d $(DESTDIR)$(STATEDIR)/predictors ]; then \
		install -d -m 0755 $(DESTDIR)$(STATEDIR)/predictors && \
		install -m 0644 predictors/hello.py predictors/hello.toml $(DESTDIR)$(STATEDIR)/predictors/; fi

install-user:
	getent passwd $(SERVICE_USER) >/dev/null || useradd --system --user-group --home-dir $(STATEDIR) \
		--shell /usr/sbin/nologin --comment "predictord serving daemon" $(SERVICE_USER)
	chown $(SERVICE_USER):$(SERVICE_USER) $(STATEDIR)

# Removes what install added; leaves $(STATEDIR)/predictors (your predictors) and a config you changed.
uninstall:
	@[ "$$(id -u)" = 0 ] || { echo "make uninstall needs root: sudo make uninstall"; exit 1; }
	-@if [ -d /run/systemd/system ]; then systemctl disable --now predictord.socket predictord.service; fi
	rm -f $(UNITDIR)/predictord.service $(UNITDIR)/predictord.socket
	-@if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	rm -rf $(PREFIX)
	@if cmp -s systemd/config.toml $(SYSCONFDIR)/config.toml; then rm -f $(SYSCONFDIR)/config.toml; \
		rmdir --ignore-fail-on-non-empty $(SYSCONFDIR); else echo "kept $(SYSCONFDIR)/config.toml (changed)"; fi
	-getent passwd $(SERVICE_USER) >/dev/null && userdel $(SERVICE_USER)
	@echo "kept $(STATEDIR)/predictors (your predictors); remove it yourself if you want it gone"
