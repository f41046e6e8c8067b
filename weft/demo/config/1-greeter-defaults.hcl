# greeter speaks gRPC: routers and splitters need an HTTP-like protocol on the whole chain.
Kind     = "service-defaults"
Name     = "greeter"
Protocol = "grpc"
