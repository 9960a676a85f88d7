<?php

// Send one mail through smtpgate: send() returns as soon as the daemon has
// stored the message durably; smtpgate relays it, retrying while the mail
// server is slow or down. Errors are exceptions (SmtpGate\Exception\*).
//   php examples/send_email.php [unix:///PATH | tcp://HOST:PORT]
// The daemon's address: the argument, else $SMTPGATE_SERVER, else tcp://127.0.0.1:2526.

declare(strict_types=1);

require __DIR__ . '/../autoload.php';

$gate = new SmtpGate\Client(($argv[1] ?? getenv('SMTPGATE_SERVER')) ?: SmtpGate\Client::DEFAULT_URI);
$id = $gate->send([
    'from' => '小店 <shop@example.com>', 'to' => 'kelly@example.org',
    'subject' => '您的订单已发货', 'text' => "您好！\n\n您的订单今天已经发出，请注意查收。",
]);
echo "queued as {$id}\n";
