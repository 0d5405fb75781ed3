"""The agent process: owns a state dir's data path, applies policy, serves the control socket.

Modules: agent (the Agent and `agent run`), control (the socket server), state (state.json and
what is attached where), teardown (`bulkhead down`).
"""
