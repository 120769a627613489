# make demo: install what is needed, then run three hosts in network namespaces.
# make test: the whole suite (unit tests; as root also TUN, namespaces, etcd).
# make fuzz FUZZ_SECONDS=600: each libFuzzer target (fuzz/) for that long, under ASan and UBSan.
PY ?= python3
APT_PACKAGES := iperf3 etcd-server etcd-client socat iproute2 iputils-ping procps containernetworking-plugins openssl nftables tshark clang sockperf
STAMP := build/.setup-stamp
FUZZ_SECONDS ?= 60

.PHONY: apt-packages setup build demo demo-etcd demo-pods test test-unit lint bench bench-quick bench-control bench-lookup bench-profile fuzz soak scale clean

setup: $(STAMP)

# The one list of what the tests need from apt; .ci/run installs it too.
apt-packages:
	@echo $(APT_PACKAGES)

$(STAMP): pyproject.toml setup.py
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "apt-get install$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	$(PY) -m pip install -q -e '.[test,bench]'
	@mkdir -p build && touch $(STAMP)

build: setup
	$(PY) setup.py -q build_ext --inplace

demo: build
	$(PY) -m lab.demo

demo-etcd: build
	$(PY) -m lab.demo --etcd

demo-pods: build
	$(PY) -m lab.demo --pods

test: build
	$(PY) -m pytest -q -rs tests

test-unit: build
	$(PY) -m pytest -q -rs tests/unit

lint:
	ruff check tunproxy tests bench fuzz lab
	mypy tunproxy

bench: build
	$(PY) -m bench

bench-quick: build
	$(PY) -m bench --quick

bench-control: build
	$(PY) -m bench.control

# Ten minutes of traffic while peers join, leave, restart and lose leases (SOAK_SECONDS=... to change).
soak: build
	$(PY) -m bench.soak --seconds $(or $(SOAK_SECONDS),600)

# One etcd holding 2,000 leases and three daemons: route latency, a full relist, memory.
scale: build
	$(PY) -m bench.scale

bench-lookup: build
	$(PY) -m bench.lookup

# Where one TCP stream's CPU goes (perf on every CPU), tunproxy udp against kernel VXLAN.
bench-profile: build
	@command -v perf >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null; }
	$(PY) -m bench.profile

fuzz: setup
	$(PY) -m fuzz --seconds $(FUZZ_SECONDS)

clean:
	rm -rf build *.egg-info tunproxy/_fastpath_cffi* .pytest_cache .hypothesis
