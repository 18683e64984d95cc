"""Generated code for ``zerotrain.v1`` (do not edit; run ``make generate``)."""
