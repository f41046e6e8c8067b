# A call with the header x-canary: 1 always goes to v2; everything else goes to the split.
Kind = "service-router"
Name = "greeter"
Routes = [
  {
    Match {
      HTTP {
        Header = [{ Name = "x-canary", Exact = "1" }]
      }
    }
    Destination {
      ServiceSubset = "v2"
    }
  },
]
