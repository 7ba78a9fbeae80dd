"""The bundled model: its weights and model card (default/), the synthetic shapes it was trained on and its
eval draws (shapes.py), and its motion plan (planner.py: prompt words -> a silhouette path its control
branch follows). Its training and card live with the developer tools (longtake/tools/).

May import: numpy, the pure core, quality measures and the request. Never the engine, the executors or HTTP.
"""
