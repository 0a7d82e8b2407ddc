# Everything installs itself into .venv: `make test` and `make demo` work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install test lint demo demo3d app bench paper-quick clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch first: otherwise pip resolves a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The demo: embedded synthetic MRI, a tiny BEiT/UperNet base (decodes at half resolution) pretrained on 4 centers, the
# default adapter (DEFAULT_METHOD) for the held-out 5th,
# the center x center matrix, routing by center signatures, and masks for test scans routed automatically.
DEMO := outputs/demo
DEMO_CENTERS := t1w_3t t1w_1p5t t1w_3t_lowres pdw_1p5t
DEMO_NEW := flair_1p5t
DEMO_ADAPTER := $(DEMO)/center-$(DEMO_NEW)

demo: $(VENV)/.installed
	$(PY) recipes/pretrain_base.py --base beit-tiny --centers $(DEMO_CENTERS) --image_size 64 --num_epochs 80 \
		--batch_size 8 --learning_rate 3e-3 --warmup_steps 64 --output_dir $(DEMO)/base
	$(PY) recipes/finetune_center.py --base_model $(DEMO)/base --new_center $(DEMO_NEW) \
		--num_train_cases 8 --num_epochs 30 --eval_centers $(DEMO_CENTERS) $(DEMO_NEW) --output_dir $(DEMO_ADAPTER)
	$(PY) recipes/evaluate_centers.py --base_model $(DEMO)/base --models $(DEMO_ADAPTER) \
		--centers $(DEMO_CENTERS) $(DEMO_NEW) --output_dir $(DEMO)/eval
	$(PY) recipes/evaluate_routing.py --base_model $(DEMO)/base --adapters $(DEMO_ADAPTER) \
		--signature_centers $(DEMO_CENTERS) --output_dir $(DEMO)/routing
	# Masks for test scans of the new and an old center, each routed by its signature (old center -> the base).
	SCANS=$$($(PY) -c "from peft_medseg.data.synthetic import synthetic_cache_dir as d; print(d())") && \
	$(PY) recipes/predict.py --base_model $(DEMO)/base --adapters $(DEMO_ADAPTER) --route auto \
		--overwrite --output_dir $(DEMO)/predictions "$$SCANS/$(DEMO_NEW)/images/sub02?_slice1.png" \
		"$$SCANS/t1w_3t/images/sub02?_slice2.png"

# The 3D demo: embedded two-channel head volumes (generated on first use), MONAI's UNETR pretrained on 4 simulated
# centers, the default adapter for a held-out 5th, the center x center matrix on whole volumes (sliding window; Dice,
# HD95 in mm; heatmap and overlay PNGs), and predicted NIfTI masks in the scans' own geometry.
DEMO3D := outputs/demo3d
DEMO3D_CENTERS := t1_pet_a t1_pet_b t2_pet_c pd_pet_d
DEMO3D_NEW := flair_pet_e
DEMO3D_ADAPTER := $(DEMO3D)/center-$(DEMO3D_NEW)

demo3d: $(VENV)/.installed
	$(PY) recipes/pretrain_base.py --base unetr-tiny --dataset synthetic3d --centers $(DEMO3D_CENTERS) \
		--num_epochs 3 --batch_size 2 --learning_rate 2e-3 --validation_fraction 0.1 --output_dir $(DEMO3D)/base
	# Without activation checkpointing: at 64³ memory is not short, and recomputing would cost the demo time.
	$(PY) recipes/finetune_center.py --base_model $(DEMO3D)/base --dataset synthetic3d --new_center $(DEMO3D_NEW) \
		--num_epochs 6 --batch_size 2 --eval_centers $(DEMO3D_NEW) --gradient_checkpointing false \
		--output_dir $(DEMO3D_ADAPTER)
	$(PY) recipes/evaluate_centers.py --base_model $(DEMO3D)/base --models $(DEMO3D_ADAPTER) --dataset synthetic3d \
		--centers $(DEMO3D_CENTERS) $(DEMO3D_NEW) --num_overlays 1 --output_dir $(DEMO3D)/eval
	SCANS=$$($(PY) -c "from peft_medseg.data.synthetic3d import synthetic_volumes_dir as d; print(d())") && \
	$(PY) recipes/predict.py --base_model $(DEMO3D)/base --adapter $(DEMO3D_ADAPTER) --overwrite \
		--output_dir $(DEMO3D)/predictions "$$SCANS/$(DEMO3D_NEW)/images/$(DEMO3D_NEW)_000.nii.gz"

# The interactive app (Gradio) on the demo's base and adapter: http://127.0.0.1:7860
app: $(VENV)/.installed
	$(PY) recipes/app.py --base_model $(DEMO)/base --adapters $(DEMO_ADAPTER)

# Overhead ratios and cost curves (latency, FLOPs, training memory, mixed batches), ViT-S sized, 224 px; PNGs in outputs/bench/; see README "Speed and memory".
bench: $(VENV)/.installed
	$(PY) recipes/bench_overhead.py

# The paper's protocol on the embedded data, CI-sized (one seed, short budgets).
paper-quick: $(VENV)/.installed
	$(PY) recipes/reproduce_paper.py --quick --output_dir outputs/paper-quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
