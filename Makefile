# Entry points for a fresh machine. Extra arguments: make demo ARGS="--set key=value"
.PHONY: demo test lint clean

ARGS ?=

demo:
	bash scripts/demo.sh $(ARGS)

test:
	bash scripts/test.sh $(ARGS)

lint:
	bash scripts/setup_env.sh
	.venv/bin/ruff check .

clean:
	rm -rf outputs build .pytest_cache .ruff_cache *.egg-info
	find . -path ./.venv -prune -o -type d -name __pycache__ -exec rm -rf {} +
