"""fxq's graph passes, one per module; each is ``(GraphModule, PassContext) -> GraphModule``."""

# The pipeline's order by name (`fxq.api.PASSES` holds the functions): readable without importing
# torch, for the command's `--help`.
ORDER = ("trace", "fold_bn", "rewrite_layers", "equalize", "fuse", "insert_observers", "calibrate",
         "reconstruct", "correct_bias", "convert", "quantize_add", "record_stats")
