"""autoscaler: scaling engine replicas on memory pressure.

    policy.py        the pure decision (ClusterLoad -> replicas), no Ray
    serve_policy.py  its Ray Serve glue (a custom autoscaling policy reading replicas' stats)
"""
