"""What bare mitmdump needs in the benchmark to pass SSE on as it comes: every response streams."""


def responseheaders(flow):
    flow.response.stream = True
