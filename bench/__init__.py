"""Side-by-side benchmarks of ota-broker, stock amqtt, Mosquitto and nginx: see bench/run.py and docs/benchmarks.md."""
