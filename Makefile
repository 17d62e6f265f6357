# The two commands of the README. Both set up .venv first (fast when already done).
SHELL := /bin/bash
VENV := .venv/bin

.PHONY: setup quickstart test lint bench lock

setup:
	@bash scripts/setup.sh

quickstart: setup
	$(VENV)/python -m launch.cli quickstart

test: setup
	$(VENV)/python -m pytest -q

lint: setup
	$(VENV)/ruff check . && $(VENV)/ruff format --check .

lock: setup
	@bash scripts/lock.sh
