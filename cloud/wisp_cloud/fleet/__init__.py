"""Capacity and goodput: `wisp bench` (a real server and an edge fleet) and `wisp simulate` (discrete events).

Modules: workload (prompts, arrivals, SLOs), profiles (measured device and link profiles), trace (acceptance
traces from a real pair), emulated (emulated edge devices on the real client), bench (the sweep), simulate
(the discrete-event model over the same scheduler, estimator and controllers), plots.
"""
