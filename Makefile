# evlu-gateway — the two commands of the README:
#   make run    the main job: boot the appliance with the embedded KMS and one encrypted
#               LUN served by gatewayd, print how to connect; Ctrl-C powers it off
#   make test   install what the tests need (idempotent) and run them all:
#               the native tier, then the appliance VM tier (QEMU)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Debian's targetcli, rtslib-fb, configshell-fb and gi, importable from the venv
# as in the appliance (whose venv has the system site packages): after the
# venv's own packages, so the project's pinned versions win.
DEBIAN_PTH := $(VENV)/.debian-dist-packages-stamp
APT_PACKAGES := cryptsetup-bin python3 python3-venv libssl3 util-linux e2fsprogs \
                mmdebstrap qemu-system-x86 qemu-utils qemu-block-extra libiscsi-bin \
                dbus-daemon python3-dbus \
                targetcli-fb python3-rtslib-fb python3-configshell-fb python3-gi

.PHONY: run demo-native test test-native test-vm appliance deps system-deps bench bench-appliance clean

run: deps
	$(PY) appliance/run --demo

# The library alone, no VM: one file-backed eVLU, its ciphertext, cryptsetup reading it.
demo-native: deps
	$(PY) -m gateway.demo

# The VM tier builds the appliance image first when its inputs changed (cached
# outside the clone, see appliance/image.py), boots it under QEMU, powers it off.
NATIVE_TESTS := $(PY) -m pytest -m 'not vm'
VM_TESTS     := $(PY) -m pytest -m vm tests/vm --durations=12

test: deps
	$(NATIVE_TESTS)
	$(VM_TESTS)

test-native: deps
	$(NATIVE_TESTS)

test-vm: deps
	$(VM_TESTS)

appliance: deps
	$(PY) appliance/build

bench: deps
	$(PY) bench/xts.py
	$(PY) bench/kms.py
	$(PY) bench/tcmu.py

# user:evlu vs tcmu-runner vs LIO fileio in one appliance VM (boots it; minutes under TCG)
bench-appliance: deps
	$(PY) bench/appliance_tcmu.py

deps: system-deps $(STAMP) $(DEBIAN_PTH)

# Debian packages, installed only when something is missing (root on Debian 12).
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@for c in cryptsetup mmdebstrap qemu-system-x86_64 qemu-io iscsi-inq targetcli; do \
	  command -v $$c >/dev/null || { echo "$$c not found after install" >&2; exit 1; }; \
	done

# The venv is rebuilt when the dependency declarations change.
$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

$(DEBIAN_PTH): $(STAMP)
	echo /usr/lib/python3/dist-packages > \
	  "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/evlu-debian-dist-packages.pth"
	$(PY) -c 'import gi, targetcli, rtslib_fb, configshell_fb'
	@touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis demo
