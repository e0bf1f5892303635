"""Short, runnable scripts to copy from; installed as ``relict_callbacks.examples`` so ``relict demo`` can run them."""
