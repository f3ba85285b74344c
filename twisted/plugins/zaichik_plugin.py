from twisted.application.service import ServiceMaker

zaichik = ServiceMaker("zaichik", "zaichik.tap", "The zaichik pub/sub broker.", "zaichik")
