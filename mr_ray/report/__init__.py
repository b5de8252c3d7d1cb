"""The evaluation report: markdown (`markdown`), the HTML page a user opens (`html`) and its plots (`plots`),
all rendered from the numbers `mr_ray.evaluate.evaluate_systems` returns (an `EvaluationResult`)."""
