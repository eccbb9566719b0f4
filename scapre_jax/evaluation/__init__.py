"""`scapre-jax eval`: what the edited model draws, scored as the paper does."""
