// Node-RED settings for one replica of the HA example. Every replica runs the
// same flows.json; what differs comes from the environment:
//   PORT       the replica's own HTTP port (flowgate balances them)
//   HOST       the address it listens on (default 127.0.0.1)
//   REPLICA    a name the flows put in their answers
//   MQTT_HOST, MQTT_PORT  flowgate's MQTT listener (used by flows.json)
module.exports = {
    uiPort: Number(process.env.PORT || 1880),
    uiHost: process.env.HOST || "127.0.0.1",
    flowFile: "flows.json",
    credentialSecret: false,
    // GET /flows/state answers, so flowgate's health check sees the flows running
    runtimeState: { enabled: true },
    mqttReconnectTime: 5000,
    logging: { console: { level: process.env.NODE_RED_LOG || "info", metrics: false, audit: false } },
    telemetry: { enabled: false },
    diagnostics: { enabled: false },
    editorTheme: { tours: false, projects: { enabled: false } },
};
