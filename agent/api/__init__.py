"""The agent's gRPC API: pycilium.proto, its checked-in generated code, the server and the
AgentStateProvider protocol the agent implements (plain dataclasses, no protobuf)."""
