"""Planner: capacity math and the GPU topology (NVML) that layout choices depend on."""
