"""Generated code for the ``zerotrain`` protobuf package."""
