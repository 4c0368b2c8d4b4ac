// MQTT.js over WebSocket: connects to the URL given, subscribes to mqttjs/echo, publishes to
// it, and once its message is back publishes 100,000 bytes to mqttjs/out for a TCP subscriber.
// Prints what it received as JSON and exits 0; prints why and exits 1 on any failure or after
// 20 s.
//
//   node pubsub.js ws://127.0.0.1:8083/mqtt [3|4|5] [CA-FILE]
//
// With a CA file (for wss:// URLs), the broker's certificate must be signed by that CA.
'use strict';

const mqtt = require('mqtt');

const url = process.argv[2];
const protocolVersion = Number(process.argv[3] || 5);
const caFile = process.argv[4];

function fail(why) {
  console.error(`MQTT.js: ${why}`);
  process.exit(1);
}

const timer = setTimeout(() => fail('timed out'), 20000);
const client = mqtt.connect(url, {
  protocolVersion,
  // MQTT 3.1 names itself MQIsdp; MQTT.js then offers the subprotocol mqttv3.1.
  ...(protocolVersion === 3 ? { protocolId: 'MQIsdp' } : {}),
  clientId: `mqttjs-v${protocolVersion}-${process.pid}`,
  reconnectPeriod: 0,
  connectTimeout: 10000,
  ...(caFile ? { ca: require('fs').readFileSync(caFile), rejectUnauthorized: true } : {}),
});
const received = [];

client.on('error', (e) => fail(`error: ${e.message}`));
client.on('close', () => {
  if (received.length === 0) fail('closed before the message came back');
});
client.on('connect', async () => {
  try {
    await client.subscribeAsync('mqttjs/echo', { qos: 1 });
    await client.publishAsync('mqttjs/echo', `hello from MQTT.js v${protocolVersion}`, { qos: 1 });
  } catch (e) {
    fail(e.message);
  }
});
client.on('message', async (topic, payload, packet) => {
  received.push({ topic, payload: payload.toString(), qos: packet.qos });
  try {
    await client.publishAsync('mqttjs/out', Buffer.alloc(100000, 7), { qos: 1 });
    await client.endAsync();
  } catch (e) {
    fail(e.message);
  }
  clearTimeout(timer);
  console.log(JSON.stringify({ received }));
});
