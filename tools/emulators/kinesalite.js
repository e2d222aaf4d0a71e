// Starts kinesalite in memory on a port the kernel picks, and prints the address it listens
// on ("Listening at http://127.0.0.1:<port>") once it does. kinesalite's own cli.js reads
// `--port 0` as its default port, 4567; a port chosen by the test and then handed to the
// emulator could be taken by another process in between. Options (e.g. createStreamMs) come
// as one JSON object in the first argument.
'use strict'
var options = JSON.parse(process.argv[2] || '{}')
var server = require('kinesalite')(options).listen(0, '127.0.0.1', function () {
  console.log('Listening at http://127.0.0.1:%d', server.address().port)
})
