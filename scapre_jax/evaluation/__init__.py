"""`scapre-jax eval`: what the edited model draws, scored as the paper does.

protocol  suites (objects, artists, nsfw, coco), their prompts and defaults
images    rendering base and edited images once, cached on disk by content
run       EvalConfig and run(config): check, render, score, report
report    eval.json entries, the markdown table, grids and plots
metrics   the released metric arithmetic
clip, classifier, nudity  the scorers (pixels, files: their preprocessing
          and locating); tiny_scorers: tiny random-weight ones for tests
"""
