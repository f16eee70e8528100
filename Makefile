# The two commands of the README:
#   make demo   set everything up, then run the perception node on sample frames and instructions
#   make test   set everything up, then run the whole test suite
.PHONY: setup demo test bench-cpu train-demo clean

setup:
	tools/setup.sh

demo: setup
	tools/with_env.sh python -m lisa_ros.demo

test: setup
	tools/with_env.sh python -m pytest tests

bench-cpu: setup
	tools/with_env.sh python bench/bench_core.py --preset tiny --device cpu

train-demo: setup
	tools/with_env.sh python -m training.demo

clean:
	rm -rf build install log .stamps
