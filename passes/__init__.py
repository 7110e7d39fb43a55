"""fxq's graph passes, one per module; each is ``(GraphModule, PassContext) -> GraphModule``."""
