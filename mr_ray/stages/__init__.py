"""The pipeline's stages, one module per part of the method, in the order they run. A stage is a plain
function of its `StageContext`, the only door to the run config (a view of the sections the stage declares in
`mr_ray.pipeline.STAGES`), its inputs, its output folder and its limits; everything below it is library code
that takes plain values."""
