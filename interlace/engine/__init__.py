"""Engine: communication transports, overlap algorithms, pipelines, planner, telemetry."""
