# The canary: 90 % of calls to v1, 10 % to v2, decided per call.
Kind = "service-splitter"
Name = "greeter"
Splits = [
  { Weight = 90, ServiceSubset = "v1" },
  { Weight = 10, ServiceSubset = "v2" },
]
